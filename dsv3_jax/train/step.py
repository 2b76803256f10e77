"""The pure train step: forward, loss, gradients over micro-batches, the optimizer update and the bias update.

The train state (train/state.py) is plain pytrees: `params` and `bias` are pure dicts that `nnx.merge(graphdef,
params, bias)` turns back into a model inside jit. Gradients are taken with respect to `params` only; the router
bias is updated afterwards from the expert counts the forward pass returns, counted over the whole global batch (a
global jax.Array: the sum over the batch axis spans every shard and process) and summed over micro-batches. Under
remat the counts are forward outputs, so recomputation cannot count them twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.config import Config, TrainConfig
from dsv3_jax.kernels.varying import sum_over_devices, varying, varying_axes
from dsv3_jax.model.moe_backends import BACKENDS
from dsv3_jax.model.routing import max_violation, update_bias
from dsv3_jax.parallel import data_parallel
from dsv3_jax.parallel.sharding import constrain, dims_axes, logical_size, mesh_axes, mesh_size, param_axes, state_specs
from dsv3_jax.train import losses
from dsv3_jax.train.state import TrainState, learning_rate, split_abstract

BATCH_KEYS = ("tokens", "segment_ids", "positions")
STACKS = ("dense_layers", "moe_layers")  # the parameters' scanned layer stacks


def mtp_lambda(step: jax.Array, cfg: TrainConfig) -> jax.Array:
    switch = cfg.mtp_lambda_switch_step
    return jnp.asarray(cfg.mtp_lambda if switch is None else jnp.where(step < switch, cfg.mtp_lambda,
                                                                         cfg.mtp_lambda_late), jnp.float32)


def bias_gamma(step: jax.Array, cfg: TrainConfig) -> jax.Array:
    """The bias speed; 0 (bias frozen at its initial zeros) unless the balancing strategy is aux_free."""
    if cfg.balance != "aux_free":
        return jnp.zeros((), jnp.float32)
    stop = cfg.bias_gamma_stop_step
    return jnp.asarray(cfg.bias_gamma if stop is None else jnp.where(step < stop, cfg.bias_gamma, 0.0), jnp.float32)


def update_router_bias(bias: dict, counts: dict, gamma: jax.Array) -> dict:
    """Apply `routing.update_bias` to every router from the global-batch counts: `counts` has the structure of `bias`
    (`Transformer.router_counts`), so each layer's counts meet its own bias by tree structure, not by path."""
    return jax.tree.map(lambda b, c: update_bias(b, c, gamma), bias, counts)


def forward(graphdef, params, bias, batch: dict, mtp: bool = True):
    """The model on the input columns [:, :-1] of a packed batch; MTP counts only positions with a target."""
    return run_model(graphdef, params, bias, batch, mtp)[1]


def run_model(graphdef, params, bias, batch: dict, mtp: bool = True, return_logits: bool = True,
              grad_acc: dict | None = None):
    """(model, `forward`'s output): without logits, the model's `head_cross_entropy` takes the output's `normed`
    and `mtp_normed`; `grad_acc` goes to the layer scans (`Transformer.__call__`)."""
    model = nnx.merge(graphdef, params, bias)
    # in a data-parallel region under impl.gather_weights=layer: the top-level weights whole (the layer scan
    # gathers its own slices; the embedding and the head use their shards, Embed and Transformer.head_*);
    # elsewhere nothing is tagged and this is the identity
    top = nnx.All(nnx.Param, lambda path, _: path[0] not in ("embed", "head"))
    nnx.update(model, data_parallel.gather_params(nnx.state(model, top), stacked=False))
    depth = len(model.mtp)
    mtp_valid = losses.mtp_target_mask(batch["segment_ids"], depth) if mtp and depth else None
    return model, model(batch["tokens"][:, :-1], positions=batch["positions"][:, :-1],
                        segment_ids=batch["segment_ids"][:, :-1], mtp=mtp, mtp_valid=mtp_valid,
                        return_logits=return_logits, grad_acc=grad_acc)


def train_step(state: TrainState, batch: dict, graphdef, tx: optax.GradientTransformation,
               cfg: Config) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch (B, T+1), accumulating gradients over `micro_batches`."""
    tcfg, depth = cfg.train, cfg.model.num_nextn_predict_layers
    m = tcfg.micro_batches
    seg = batch["segment_ids"]
    n_tok = jnp.maximum(losses.same_document_mask(seg, 0).sum(), 1).astype(jnp.float32)
    n_mtp = jnp.stack([losses.same_document_mask(seg, k).sum() for k in range(1, depth + 1)]) if depth else \
        jnp.zeros((0,))
    n_mtp = jnp.maximum(n_mtp, 1).astype(jnp.float32)  # (M,) targets per MTP depth in the whole global batch
    lam, gamma = mtp_lambda(state.step, tcfg), bias_gamma(state.step, tcfg)
    # (B, ...) -> (m, B/m, ...) taking rows i, i+m, ...: each micro-batch keeps the batch sharding of dim 0
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)
    sums = functools.partial(_accumulate, graphdef=graphdef, cfg=cfg)
    region = data_parallel_region(cfg, micro["tokens"].shape[1])
    if region is None:
        total, aux, grads = sums(state.params, state.bias, micro, n_tok, n_mtp, lam)
    else:
        total, aux, grads = region(sums)(state.params, state.bias, micro, n_tok, n_mtp, lam)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    bias = update_router_bias(state.bias, aux["router_counts"], gamma)
    maxvio = max_violation(aux["counts"])  # (L_moe,)
    all_bias = jnp.concatenate([b.reshape(-1) for b in jax.tree.leaves(bias)] or [jnp.zeros((1,))])
    out = {
        "loss": aux["ce"], "total_loss": total, "mtp_loss": aux["mtp_ce"].mean() if depth else jnp.zeros(()),
        "balance_loss": aux["balance"], "grad_norm": grad_norm, "lr": learning_rate(state.step, tcfg),
        "mtp_lambda": lam, "bias_gamma": gamma, "maxvio": maxvio,
        "maxvio_mean": maxvio.mean() if aux["counts"].shape[0] else jnp.zeros(()),
        "dead_experts": (aux["counts"] == 0).sum(), "bias_mean": all_bias.mean(), "bias_std": all_bias.std(),
        "tokens": n_tok, "routed_tokens": aux["counts"].sum(-1),  # (L_moe,) = valid tokens x K when counted once
        "aux_balance_loss": aux["aux_balance"],
        # routed rows past impl.moe_capacity_factor (zero output), of all rows the MoE layers routed (padding too)
        "moe_dropped_fraction": aux["dropped"].sum() / float(max(aux["dropped"].size * batch["tokens"][:, :-1].size
                                                                 * cfg.model.num_experts_per_tok, 1)),
        # (L_moe, E) each: load c_i / mean(c) and the router bias after the update, for plots (metrics.layer_matrix)
        "expert_load": aux["counts"] / jnp.maximum(aux["counts"].mean(-1, keepdims=True), 1e-9),
        "router_bias": nnx.merge(graphdef, params, bias).main_router_bias(),
    }
    if depth:
        out["mtp_maxvio"] = max_violation(aux["mtp_counts"])
        out["mtp_routed_tokens"] = aux["mtp_counts"].sum(-1)  # (M,) = MTP targets x K
    return TrainState(state.step + 1, params, bias, opt_state), out


def _accumulate(params, bias, micro: dict, n_tok, n_mtp, lam, *, graphdef, cfg: Config, shards: int = 1,
                manual: tuple[str, ...] = ()):
    """(total loss, aux, gradients) summed over the micro-batches (m, b, T+1) of `micro`. In the data-parallel
    region (`manual`: its axes, `shards` devices) these are this device's sums, its gradients unreduced; the
    balance terms, computed there from counts already summed over every device, enter each device's loss
    divided by `shards` so that the sum over devices counts them once."""
    tcfg, depth, m = cfg.train, cfg.model.num_nextn_predict_layers, cfg.train.micro_batches

    chunked = cfg.impl.vocab_chunk > 0  # the head's cross-entropy over vocabulary chunks, no (B, T, V) logits

    def micro_loss(params, mb, held):
        model, out = run_model(graphdef, params, bias, mb, return_logits=not chunked, grad_acc=held or None)
        x, mtp_x = (out.normed, out.mtp_normed) if chunked else (out.logits, out.mtp_logits)
        items = [losses.next_token_item(x, mb["tokens"], mb["segment_ids"])]
        items += losses.mtp_items(mtp_x, mb["tokens"], mb["segment_ids"]) if depth else []
        # chunked: the main and MTP rows in one pass over the vocabulary (the head's chunks gathered once)
        sums = [s for s, _ in (model.head_cross_entropies(items) if chunked
                               else [losses.cross_entropy_sum(*item) for item in items])]
        ce = sums[0] / n_tok
        if depth:
            mtp_ce = jnp.stack(sums[1:]) / n_mtp
            mtp_counts = out.aux["mtp_expert_counts"]
        else:
            mtp_ce, mtp_counts = jnp.zeros((0,)), jnp.zeros((0, cfg.model.n_routed_experts))
        bal = losses.balance_loss(out.aux, tcfg.balance_alpha) / m
        aux_bal = losses.aux_balance_loss(out.aux, tcfg.aux_loss_alpha, cfg.model.num_experts_per_tok) / m \
            if tcfg.balance == "aux_loss" else jnp.zeros((), jnp.float32)
        total = ce + losses.mtp_loss(mtp_ce, lam) + (bal + aux_bal) / shards
        return total, {"ce": ce, "mtp_ce": mtp_ce, "balance": bal, "aux_balance": aux_bal,
                       "counts": out.aux["expert_counts"], "dropped": out.aux["dropped_rows"],
                       "mtp_counts": mtp_counts, "router_counts": out.aux["router_counts"]}

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    params = jax.tree.map(lambda p: varying(p, manual), params)
    # under full remat the layer scans add their weights' gradients into the sums in place (one (L, ...) buffer
    # per stacked weight, not the sums and a micro-batch's gradient: kernels/accumulating_scan.py)
    in_place = [k for k in STACKS if k in params] if cfg.impl.remat == "full" and cfg.impl.scan_layers else []

    def body(acc, mb):
        mb = {k: constrain(v, ("batch", "seq")) for k, v in mb.items()}
        sums, grads = acc
        out, g = grad_fn(params, mb, {k: grads[k] for k in in_place})
        rest = lambda t: {k: v for k, v in t.items() if k not in in_place}  # noqa: E731
        sums, added = jax.tree.map(jnp.add, (sums, rest(grads)), (out, rest(g)))
        return (sums, {**added, **{k: g[k] for k in in_place}}), None

    # the sums start as zeros typed like one micro-batch's results (varying where those are, in the region)
    zeros = jax.tree.map(lambda s: varying(jnp.zeros(s.shape, s.dtype), varying_axes(s)),
                         jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), {}))
    ((total, aux), grads), _ = jax.lax.scan(body, zeros, micro)
    return total, aux, grads


def data_parallel_region(cfg: Config, rows: int):
    """`impl.grad_reduce: step` under a mesh whose batch axes split the batch: a wrapper that runs `_accumulate`
    inside a shard_map over the batch axes (parallel/data_parallel.py) and reduces its gradients once. None when
    there is nothing to reduce, when a micro-batch's `rows` do not split evenly over the batch axes (GSPMD pads
    them), under `impl.grad_reduce: micro_batch` (GSPMD reduces the gradients of every
    micro-batch, and gathers the weights for each: less memory), or when an explicitly named local MoE backend
    must see every expert (its weights cannot stay on their expert shards). Also None under a `tensor` axis: the
    MoE layer's own shard_map over it would nest inside the region, which jax 0.10 cannot lower under autodiff
    (sdy: "operates on axis ... already bound by a parent sdy.manual_computation"; docs/scale.md)."""
    mesh = jax.sharding.get_abstract_mesh()
    if cfg.impl.grad_reduce != "step" or mesh.empty:
        return None
    manual = mesh_axes("batch")
    shards = mesh_size(mesh, manual)
    local_moe = cfg.impl.moe_impl != "auto" and not BACKENDS[cfg.impl.moe_impl].expert_parallel
    others = [a for a in mesh.axis_names if a not in manual and mesh.shape[a] > 1]
    if shards == 1 or rows % shards or others or (local_moe and logical_size(mesh, "experts") > 1):
        return None
    graphdef, abs_params, abs_bias = split_abstract(cfg)
    per_layer = cfg.impl.gather_weights == "layer"
    logical = nnx.to_pure_dict(jax.tree.map(param_axes, abs_params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    specs = nnx.to_pure_dict(state_specs(abs_params, mesh))
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    entry = jax.tree.map(lambda s, ax: data_parallel.entry_spec(s, ax, manual, per_layer), specs, logical,
                         is_leaf=is_spec)
    if per_layer:  # a graphdef whose weights carry the axes to gather them over (data_parallel.gather_params)
        tagged = nnx.merge(graphdef, nnx.to_pure_dict(abs_params), nnx.to_pure_dict(abs_bias))
        weights = nnx.state(tagged, nnx.Param)  # the model's own Variables: tagging them tags its graphdef
        jax.tree.map(lambda v, s: _tag(v, data_parallel.entry_spec(s.get_value(), param_axes(v), manual, True)),
                     weights, state_specs(weights, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))
        graphdef = nnx.graphdef(tagged)
    leave = jax.tree.map(lambda s: data_parallel.exit_spec(s, manual), specs, is_leaf=is_spec)
    rows = PartitionSpec(None, manual)

    def wrap(sums):
        def region(params, bias, micro, n_tok, n_mtp, lam):
            total, aux, grads = sums(params, bias, micro, n_tok, n_mtp, lam, shards=shards, manual=manual,
                                     **({"graphdef": graphdef} if per_layer else {}))
            grads = jax.tree.map(lambda g, s, e: data_parallel.reduce_gradient(g, s, e, manual), grads, specs,
                                 entry, is_leaf=is_spec)
            total, aux = jax.tree.map(sum_over_devices, (total, aux))
            return total, aux, grads

        return jax.shard_map(region, mesh=mesh, axis_names=set(manual),
                             in_specs=(entry, PartitionSpec(), rows, PartitionSpec(), PartitionSpec(),
                                       PartitionSpec()),
                             out_specs=(PartitionSpec(), PartitionSpec(), leave))

    return wrap


def _tag(v: nnx.Variable, entry: PartitionSpec) -> None:
    """Mark a weight that enters the region on shards (not a resident expert) with the axes to gather it over."""
    if not data_parallel.resident(param_axes(v)) and any(dims_axes(entry)):
        v.set_metadata(data_parallel.GATHER, tuple(dims_axes(entry)))


def jit_train_step(cfg: Config, graphdef, tx: optax.GradientTransformation, mesh, abstract: TrainState,
                   donate: bool = True):
    """`train_step` jitted as the trainer runs it (and the planner compiles it): the new state keeps the state's
    shardings (left to propagation, the optimizer moments came back replicated), metrics replicated."""
    return jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg),
                   out_shardings=(jax.tree.map(lambda x: x.sharding, abstract), NamedSharding(mesh, PartitionSpec())),
                   donate_argnums=(0,) if donate else ())


def eval_step(params: dict, bias: dict, batch: dict, graphdef) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropies, number of targets) on one batch, without MTP."""
    out = forward(graphdef, params, bias, batch, mtp=False)
    return losses.next_token_loss(out.logits, batch["tokens"], batch["segment_ids"])


def to_global(batch: dict, sharding, global_batch: int) -> dict:
    """This process's rows (b, T+1) -> global arrays (B, T+1) sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]),
                                                      (global_batch,) + batch[k].shape[1:]) for k in BATCH_KEYS}
