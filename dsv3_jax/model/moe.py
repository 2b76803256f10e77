"""The DeepSeekMoE layer: routed experts (sigmoid, group-limited, aux-loss-free bias) plus shared experts, and the
choice of the expert-FFN backend for a mesh and platform.

Under a mesh whose batch axes split the batch, the layer runs inside `jax.shard_map`: each device routes its own
tokens, and the counts and balance-loss sums are psum'd once over the batch axes. The layer returns its expert
counts in `aux` (the train step updates the bias from them; nothing is sown or looked up by path).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ImplConfig, ModelConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.kernels.platform import platform
from dsv3_jax.kernels.precision import Policy, policy
from dsv3_jax.model.layers import MLP, param
from dsv3_jax.model.moe_backends import BACKENDS, ExpertWeights, MoeContext, split_tokens
from dsv3_jax.model.routing import (
    RouterBias,
    Routing,
    expert_counts,
    router_scores,
    select_experts,
    sequence_balance_terms,
)
from dsv3_jax.parallel.sharding import current_rules, mesh_axes, mesh_size


def local_impl(platform: str) -> str:
    """The grouped matmul for this platform: ragged_dot is native only on TPU (GPU pads it to a dense matmul)."""
    return "ragged_dot" if platform == "tpu" else "blocked"


MOE_IMPLS = ("auto", *BACKENDS)  # what impl.moe_impl may name

# Blocks per step of the blocked form's loop over its used blocks when impl.moe_blocks_per_step is None, by
# platform: on XLA:CPU the loop beats one batched matmul (docs/performance.md); elsewhere one batched matmul.
AUTO_BLOCKS_PER_STEP = {"cpu": 8}


def choose(impl: str, mesh, rules: dict, batch: int, num_experts: int, ffn: int, block: int, pol: Policy,
           platform: str, chunk_tokens: int = 0, blocks_per_step: int | None = None,
           capacity_factor: float | None = None, seq: int = 0) -> tuple[str, MoeContext, bool]:
    """(backend name, context, whether to run inside shard_map) for `impl.moe_impl` on this mesh.

    `auto` is expert-parallel whenever the experts are split (ragged all-to-all on TPU/GPU, the dense exchange
    elsewhere), else the platform's local grouped matmul, and whenever the batch splits over the mesh it runs
    inside shard_map, so each device routes and sorts only its own tokens. A local backend named explicitly runs
    over the global batch and lets GSPMD partition it (the baseline, which gathers the whole batch's routing onto
    every device); so does everything when the batch does not split (decoding one sequence). Expert axes that do
    not split the batch (`tensor` in `experts: [fsdp, expert, tensor]`) split the tokens their devices share
    before the exchange (`token_split_axes`). Inside the train step's data-parallel region the batch axes are
    manual: the layer sees its device's rows and shard_maps over the remaining axes only. Under a mesh that
    splits the sequence (`seq_axes` of a trace of `seq` tokens a row) those axes split the tokens too: each
    device routes and computes its own chunk."""
    local = local_impl(platform)
    if blocks_per_step is None:
        blocks_per_step = AUTO_BLOCKS_PER_STEP.get(platform, 0)
    ctx = MoeContext(pol, block, local, blocks_per_step=blocks_per_step)
    if mesh.empty:
        return (local if impl == "auto" else impl), ctx, False
    ep_axes, batch_axes = mesh_axes("experts", rules), mesh_axes("batch", rules)
    ep = mesh_size(mesh, ep_axes)
    auto = impl == "auto"
    if auto:
        impl = ("ep_ragged" if platform in ("gpu", "tpu", "cuda", "rocm") else "ep_a2a") if ep > 1 else local
    # `batch` is this trace's batch: inside the train step's data-parallel region the batch axes are manual already,
    # and the layer sees only this device's tokens, so it must reduce its counts over them (sharded)
    free_batch = tuple(a for a in batch_axes if a not in mesh.manual_axes)
    in_region = len(free_batch) < len(batch_axes)
    if batch % mesh_size(mesh, free_batch) or not (auto or BACKENDS[impl].expert_parallel):
        return (local if BACKENDS[impl].expert_parallel else impl), ctx, in_region
    tok_axes = batch_axes + seq_axes(mesh, rules, seq)
    ffn_axes = tuple(a for a in mesh_axes("expert_mlp", rules)
                     if a not in tok_axes and a not in ep_axes and mesh.shape[a] > 1)
    ctx = dataclasses.replace(ctx, ffn_axes=ffn_axes if ffn % mesh_size(mesh, ffn_axes) == 0 else ())
    if not BACKENDS[impl].expert_parallel:
        return impl, ctx, True
    if num_experts % ep:
        raise ConfigError(f"model.n_routed_experts ({num_experts}) is not divisible by the expert-parallel size "
                          f"{ep} (mesh {'*'.join(ep_axes)})")
    # expert axes that do not split the batch (`tensor` in `experts: [expert, tensor]`) hold the same tokens: each
    # of their devices sends its own slice of them, so no row is exchanged twice
    split = tuple(a for a in ep_axes if a not in tok_axes and mesh.shape[a] > 1)
    return impl, dataclasses.replace(ctx, expert_axes=ep_axes, token_split_axes=split,
                                     chunk_tokens=chunk_tokens, capacity_factor=capacity_factor), True


def seq_axes(mesh, rules: dict, seq: int) -> tuple[str, ...]:
    """The mesh axes that split the sequence of this trace (`seq` tokens a row; `context`), when they divide it and
    no enclosing shard_map made them manual; () otherwise (each device then sees whole rows)."""
    if mesh.empty or not seq:
        return ()
    axes = tuple(a for a in mesh_axes("seq", rules)
                 if a in mesh.shape and a not in mesh.manual_axes and mesh.shape[a] > 1)
    return axes if axes and seq % mesh_size(mesh, axes) == 0 else ()


class MoE(nnx.Module):
    """Routed experts (sigmoid, group-limited, aux-loss-free bias) plus always-on shared experts."""

    def __init__(self, cfg: ModelConfig, impl: ImplConfig, rngs: nnx.Rngs):
        d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        self.policy = policy(impl)
        pdt = jnp.dtype(self.policy.param_dtype)
        self.cfg, self.impl = cfg, impl
        self.router = param(rngs, (d, e), ("embed", "experts"), cfg.initializer_range, jnp.float32)
        self.bias = RouterBias(jnp.zeros((e,), jnp.float32), axes=("experts",))
        self.w_gate = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), cfg.initializer_range, pdt)
        self.w_up = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), cfg.initializer_range, pdt)
        self.w_down = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), cfg.initializer_range, pdt)
        self.shared = MLP(cfg, f * cfg.n_shared_experts, self.policy, rngs) if cfg.n_shared_experts else None

    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array, decoding: bool = False) -> tuple[jax.Array, dict]:
        """Returns the layer output and aux {expert_counts (E,), balance_loss (), expert_affinity (E,): the sum of the
        normalised affinities s_i / sum_j s_j, for the batch-level aux loss} over valid tokens, and dropped_rows ():
        routed rows (of any token) past `impl.moe_capacity_factor`, all over the whole global batch (psum'd once
        across the shards under expert parallelism). `decoding` (on the cache): a handful
        of tokens and no mesh take the `decode` backend instead of the training dispatch (`decodes`)."""
        cfg = self.cfg
        mesh, rules = jax.sharding.get_abstract_mesh(), current_rules()
        if decoding and decodes(x_btd.shape[0] * x_btd.shape[1]):
            name, ctx, sharded = "decode", MoeContext(self.policy), False
        else:
            name, ctx, sharded = choose(self.impl.moe_impl, mesh, rules, x_btd.shape[0], cfg.n_routed_experts,
                                        cfg.moe_intermediate_size, self.impl.moe_block_size, self.policy,
                                        platform(), self.impl.moe_ep_chunk_tokens,
                                        self.impl.moe_blocks_per_step, self.impl.moe_capacity_factor,
                                        x_btd.shape[1])
        weights = ExpertWeights(self.w_gate[...], self.w_up[...], self.w_down[...])
        routed = functools.partial(_routed, cfg=cfg, backend=BACKENDS[name].fn, ctx=ctx)
        args = (x_btd, valid_bt, self.router[...], self.bias[...], weights)
        if sharded:
            bat, sq = mesh_axes("batch", rules), seq_axes(mesh, rules, x_btd.shape[1])
            routed = functools.partial(routed, reduce_axes=bat, seq_axes=sq)
            free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
            # over the axes no enclosing shard_map (the train step's data-parallel region) made manual, if any splits
            if any(mesh.shape[a] > 1 for a in free) or not mesh.manual_axes:
                def spec(axes):
                    return tuple(a for a in axes if a in free) or None

                b, t, e, f = spec(bat), spec(sq), spec(ctx.expert_axes), spec(ctx.ffn_axes)
                w_in, w_out = P(e, None, f), P(e, f, None)
                routed = jax.shard_map(routed, mesh=mesh, axis_names=set(free),
                                       in_specs=(P(b, t), P(b, t), P(), P(), ExpertWeights(w_in, w_in, w_out)),
                                       out_specs=(P(b, t), P(), P(), P(), P()))
        y_btd, counts, balance, affinity, dropped = routed(*args)
        y_btd = y_btd.astype(x_btd.dtype)
        if self.shared is not None:
            y_btd = y_btd + self.shared(x_btd)
        return y_btd, {"expert_counts": counts, "balance_loss": balance, "expert_affinity": affinity,
                       "dropped_rows": dropped}


def _routed(x_btd, valid_bt, router_de, bias_e, weights: ExpertWeights, *, cfg: ModelConfig, backend, ctx,
            reduce_axes: tuple[str, ...] = (), seq_axes: tuple[str, ...] = ()):
    """Route these tokens, run the backend, count: (y (B, T, D), expert counts (E,), balance loss (), affinity sum
    (E,)). Inside shard_map the counts and the balance-loss and affinity sums are psum'd over the batch axes, and
    over the axes that split the sequence (`seq_axes`): the balance terms' per-sequence sums before their product."""
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    scores = router_scores(x_nd, router_de)  # (N, E) float32
    idx, gates = select_experts(scores, bias_e, cfg)
    if ctx.token_split_axes:
        y_nd, dropped = split_tokens(backend, x_nd, Routing(idx, gates), weights, ctx)
    elif ctx.expert_axes:
        y_nd, dropped = backend(x_nd, Routing(idx, gates), weights, ctx)
    else:
        y_nd, dropped = backend(x_nd, Routing(idx, gates), weights, ctx), jnp.zeros((), jnp.int32)
    if ctx.ffn_axes:  # each device computed its slice of every expert's hidden width: partial sums
        y_nd = jax.lax.psum(y_nd, ctx.ffn_axes)
    counts = expert_counts(idx, valid_bt.reshape(-1), cfg.n_routed_experts)
    bal_sum, n_seq = sequence_balance_terms(scores.reshape(b, t, -1), idx.reshape(b, t, -1), valid_bt,
                                            cfg.num_experts_per_tok, seq_axes)
    affinity = ((scores / scores.sum(-1, keepdims=True)) * valid_bt.reshape(-1, 1)).sum(0)  # (E,)
    if reduce_axes or seq_axes:  # the balance sums are whole-sequence ones already, alike on every chunk
        counts, affinity, dropped = jax.lax.psum((counts, affinity, dropped), reduce_axes + seq_axes)
        bal_sum, n_seq = jax.lax.psum((bal_sum, n_seq), reduce_axes) if reduce_axes else (bal_sum, n_seq)
    return y_nd.reshape(b, t, d), counts, bal_sum / jnp.maximum(n_seq, 1.0), affinity, dropped


# The decode path: a handful of tokens on the latent cache (`MoE(..., decoding=True)`). Same routing, same aux; the
# `decode` backend instead of the training dispatch.
DECODE_MAX_TOKENS = 128


def decodes(n_tokens: int) -> bool:
    """Whether the decode path takes `n_tokens` tokens: few of them, and no mesh (under a mesh the layer's own
    sharded dispatch stays in charge)."""
    return n_tokens <= DECODE_MAX_TOKENS and jax.sharding.get_abstract_mesh().empty
