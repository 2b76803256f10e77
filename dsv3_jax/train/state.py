"""The train state and what fixes its shape: the abstract model, the optimizer (its state is part of the train
state) and the learning-rate schedule it carries. One home that both the trainer and checkpoint restores import.

The train state is plain pytrees: `params` (the nnx.Param values) and `bias` (the RouterBias values) are pure
dicts that `nnx.merge(graphdef, params, bias)` turns back into a model inside jit.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.config import Config, ImplConfig, ModelConfig, TrainConfig
from dsv3_jax.model.routing import RouterBias
from dsv3_jax.model.transformer import Transformer, create
from dsv3_jax.parallel.sharding import state_shardings


class TrainState(NamedTuple):
    step: jax.Array  # () int32: optimizer steps taken
    params: dict  # pure dict of parameter arrays (differentiated, in the optimizer)
    bias: dict  # pure dict of router biases (not differentiated, not in the optimizer)
    opt_state: Any  # optax state over `params`


def learning_rate(step: jax.Array, cfg: TrainConfig) -> jax.Array:
    """Linear warmup to the peak, constant for `constant_steps`, then cosine to `min_learning_rate` at `steps`."""
    s = jnp.asarray(step, jnp.float32)
    warm = cfg.learning_rate * jnp.minimum(1.0, (s + 1) / max(cfg.warmup_steps, 1))
    flat_end = cfg.warmup_steps + cfg.constant_steps
    frac = jnp.clip((s - flat_end) / max(cfg.steps - flat_end, 1), 0.0, 1.0)
    cosine = cfg.min_learning_rate + (cfg.learning_rate - cfg.min_learning_rate) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    return jnp.where(s < flat_end, warm, cosine)


def decay_mask(abstract_params) -> dict:
    """Weight decay on matrices only: not on norm scales or any 1-D (per stacked layer) parameter."""
    def decays(v):
        axes = v.get_metadata().get("axes", ())
        return len(axes) >= 2 and "norm" not in axes

    return nnx.to_pure_dict(jax.tree.map(decays, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def stored_as(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` with its floating-point state kept in `dtype` between steps (updated in float32)."""
    def cast(tree, dt):
        return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(lambda params: cast(inner.init(params), dtype), update)


def make_optimizer(cfg: TrainConfig, mask: dict) -> optax.GradientTransformation:
    adamw = optax.adamw(functools.partial(learning_rate, cfg=cfg), b1=cfg.b1, b2=cfg.b2,
                        weight_decay=cfg.weight_decay, mask=mask)
    if cfg.moments_dtype != "float32":
        adamw = stored_as(adamw, jnp.dtype(cfg.moments_dtype))
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def split_abstract(cfg: Config):
    """(graphdef, abstract Param state, abstract RouterBias state) without allocating anything; traced once per
    architecture (a planner search sizes the same model on many meshes). Callers read the states, never write."""
    return _split_abstract(cfg.model, cfg.impl, cfg.train.seed)


@functools.lru_cache(maxsize=2)
def _split_abstract(model: ModelConfig, impl: ImplConfig, seed: int):
    abstract = nnx.eval_shape(lambda: Transformer(model, nnx.Rngs(seed), impl))
    return nnx.split(abstract, nnx.Param, RouterBias)


def opt_state_shardings(tx: optax.GradientTransformation, params, param_shardings, mesh):
    """Shardings of `tx.init(params)`: every parameter-shaped leaf (AdamW mu, nu) takes its parameter's sharding,
    the rest (step counts) is replicated. A plain jit of `tx.init` would replicate the moments on every device."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
                                 transform_non_params=lambda _: replicated)


def init_state(cfg: Config, mesh) -> tuple[TrainState, Any, optax.GradientTransformation]:
    """A fresh TrainState whose parameters are created directly in their shardings (`model.transformer.create`)."""
    graphdef, params, bias = nnx.split(create(cfg.model, cfg.train.seed, mesh, cfg.impl), nnx.Param, RouterBias)
    tx = make_optimizer(cfg.train, decay_mask(params))
    params, bias = nnx.to_pure_dict(params), nnx.to_pure_dict(bias)
    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh):
        step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=replicated)()
        shardings = jax.tree.map(lambda x: x.sharding, params)
        opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, shardings, mesh))(params)
    return TrainState(step, params, bias, opt_state), graphdef, tx


def abstract_state(cfg: Config, mesh=None) -> tuple[TrainState, Any, optax.GradientTransformation]:
    """(TrainState of ShapeDtypeStructs, graphdef, optimizer) with nothing allocated: what a resume restores into
    directly and what the planner compiles against. Under `mesh` every leaf carries the sharding `init_state` gives
    it; without one, none."""
    graphdef, abs_params, abs_bias = split_abstract(cfg)
    tx = make_optimizer(cfg.train, decay_mask(abs_params))

    def sds(values, shardings=None):
        if shardings is None:
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), values)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), values, shardings)

    def shardings_of(state):
        return None if mesh is None else nnx.to_pure_dict(state_shardings(state, mesh))

    params = sds(nnx.to_pure_dict(abs_params), shardings_of(abs_params))
    bias = sds(nnx.to_pure_dict(abs_bias), shardings_of(abs_bias))
    if mesh is None:
        opt_state = jax.eval_shape(tx.init, params)
        step = jax.ShapeDtypeStruct((), jnp.int32)
    else:
        opt_shardings = opt_state_shardings(tx, params, jax.tree.map(lambda x: x.sharding, params), mesh)
        opt_state = sds(jax.eval_shape(tx.init, params), opt_shardings)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    return TrainState(step, params, bias, opt_state), graphdef, tx
