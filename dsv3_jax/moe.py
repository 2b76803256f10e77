"""DeepSeekMoE: routing as pure functions, the expert-FFN backends (one registry), the bias update rule and load
statistics.

Legend: N tokens, E routed experts, K experts per token, G groups, D hidden size, F expert hidden size,
R = N*K routed rows, P padded rows (expert-aligned blocks of `block` rows), S expert-parallel shards, E_l = E/S
experts per shard, M = S*R rows a shard can receive.

Backends (`BACKENDS`, one signature): `dense` (every expert on every token, the reference), `ragged_dot` and
`blocked` (grouped matmuls over rows sorted by expert), and the expert-parallel `ep_ragged` / `ep_a2a`. Under a mesh
whose batch axes split the batch, the layer runs inside `jax.shard_map`: each device routes its own tokens, and the
counts and balance-loss sums are psum'd once over the batch axes. Expert-parallel: rows sorted by expert are sent to
the shard holding the expert, computed there by the local grouped matmul, and sent back; both exchanges follow
`jax.lax.ragged_all_to_all` semantics with offsets from `exchange_plans`. `ep_ragged` is that collective (TPU/GPU);
`ep_a2a` reproduces it with a dense `all_to_all` of R rows per peer (XLA:CPU lacks the ragged collective),
dropless and exact but moving S times the routed rows. All-gathering tokens within the expert group was rejected: on
an expert-only mesh it gathers the whole batch onto every device.

Routing order (REFERENCE.md): float32 sigmoid scores s; biased scores s + b for selection only; group score is the
sum of each group's top-2 biased scores; groups outside the best `topk_group` are masked with -inf; top-K experts
by biased score; gates from the UNBIASED s, normalised when norm_topk_prob, then times routed_scaling_factor.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ConfigError, ImplConfig, ModelConfig
from dsv3_jax.layers import MLP, param
from dsv3_jax.precision import Policy, policy, ragged_dot
from dsv3_jax.precision import einsum as policy_einsum
from dsv3_jax.sharding import current_rules, mesh_axes


class RouterBias(nnx.Variable):
    """Per-expert selection bias (`e_score_correction_bias`): explicit state, never in the gradient or optimizer."""


# ----------------------------------------------------------------------------------------------------------------
# Routing.


def router_scores(x_nd: jax.Array, w_de: jax.Array) -> jax.Array:
    """Sigmoid affinities (N, E), computed in float32 at full precision."""
    logits = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), w_de.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return jax.nn.sigmoid(logits)


def select_experts(scores_ne: jax.Array, bias_e: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Group-limited top-K selection on biased scores; gates from unbiased scores. Returns (idx (N, K), gates)."""
    n, e = scores_ne.shape
    biased = scores_ne + bias_e.astype(jnp.float32)[None]
    if cfg.n_group > 1:
        grouped = biased.reshape(n, cfg.n_group, e // cfg.n_group)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # (N, G): sum of each group's top-2
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)  # (N, topk_group)
        group_mask = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
        biased = jnp.where(jnp.repeat(group_mask, e // cfg.n_group, axis=1), biased, -jnp.inf)
    _, idx_nk = jax.lax.top_k(biased, cfg.num_experts_per_tok)
    gates = jnp.take_along_axis(scores_ne, idx_nk, axis=1)
    if cfg.norm_topk_prob:
        gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
    return idx_nk.astype(jnp.int32), gates * cfg.routed_scaling_factor


def expert_counts(idx_nk: jax.Array, valid_n: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert (E,), counting only valid (non-padding) tokens."""
    weights = jnp.broadcast_to(valid_n[:, None], idx_nk.shape).astype(jnp.float32)
    return jnp.zeros((num_experts,), jnp.float32).at[idx_nk.reshape(-1)].add(weights.reshape(-1))


def sequence_balance_loss(scores_bte: jax.Array, idx_btk: jax.Array, valid_bt: jax.Array, k: int) -> jax.Array:
    """Sequence-wise balance term sum_i f_i P_i, averaged over sequences (alpha is applied by the loss).

    f_i = E / (K T) * (tokens of the sequence choosing i); P_i = mean_t s[t, i] / sum_j s[t, j]; T counts valid
    tokens only."""
    total, n_seq = sequence_balance_terms(scores_bte, idx_btk, valid_bt, k)
    return total / jnp.maximum(n_seq, 1.0)


def sequence_balance_terms(scores_bte: jax.Array, idx_btk: jax.Array, valid_bt: jax.Array,
                           k: int) -> tuple[jax.Array, jax.Array]:
    """(sum over sequences of sum_i f_i P_i, number of sequences with tokens): sums, so shards can psum them."""
    b, t, e = scores_bte.shape
    valid = valid_bt.astype(jnp.float32)
    n_tok = jnp.maximum(valid.sum(-1), 1.0)  # (B,)
    chosen = jax.nn.one_hot(idx_btk, e, dtype=jnp.float32).sum(2) * valid[..., None]  # (B, T, E)
    f = e / (k * n_tok[:, None]) * chosen.sum(1)  # (B, E)
    s_norm = scores_bte / scores_bte.sum(-1, keepdims=True)
    p = (s_norm * valid[..., None]).sum(1) / n_tok[:, None]  # (B, E)
    per_seq = (f * p).sum(-1)
    has_tokens = (valid.sum(-1) > 0).astype(jnp.float32)
    return (per_seq * has_tokens).sum(), has_tokens.sum()


def update_bias(bias_e: jax.Array, counts_e: jax.Array, gamma: float | jax.Array) -> jax.Array:
    """Aux-loss-free balancing: b_i += gamma * sign(mean(c) - c_i), from the global batch's counts."""
    return bias_e + gamma * jnp.sign(counts_e.mean(-1, keepdims=True) - counts_e)


def max_violation(counts_e: jax.Array) -> jax.Array:
    """MaxVio = max_i c_i / mean(c) - 1 (per layer when counts are (L, E))."""
    return counts_e.max(-1) / jnp.maximum(counts_e.mean(-1), 1e-9) - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Expert-FFN backends: one registry, one signature
#     backend(x_nd, routing, weights, ctx) -> y_nd = sum_k gate_k * Expert_{idx_k}(x_n)
# Local backends see every expert; expert-parallel ones run inside `jax.shard_map` (the layer wraps them) and see
# this device's tokens and its E_l experts.


class Routing(NamedTuple):
    idx_nk: jax.Array  # (N, K) int32 chosen experts
    gates_nk: jax.Array  # (N, K) float32 gates


class ExpertWeights(NamedTuple):
    w_gate: jax.Array  # (E, D, F)
    w_up: jax.Array  # (E, D, F)
    w_down: jax.Array  # (E, F, D)


@dataclasses.dataclass(frozen=True)
class MoeContext:
    """What a backend needs besides data: the precision policy, the blocked form's block size, and for the
    expert-parallel backends the local grouped matmul, the mesh axes (experts split over `expert_axes`, the
    expert hidden width F over `ffn_axes`, whose partial outputs are psum'd) and how many tokens one exchange
    carries at most (`chunk_tokens`, 0 = all of this device's tokens at once). `blocks_per_step`: see
    `block_matmul`."""

    policy: Policy = Policy()
    block: int = 32
    local: str = "blocked"
    expert_axes: tuple[str, ...] = ()
    ffn_axes: tuple[str, ...] = ()
    chunk_tokens: int = 0
    blocks_per_step: int = 0  # the blocked form loops over the used blocks this many at a time; 0: one matmul


def combine(y_nkd: jax.Array, gates_nk: jax.Array, pol: Policy) -> jax.Array:
    """sum_k g_k y_k in float32 at HIGHEST precision (gates are float32 router outputs), in the policy's dtype."""
    y = jnp.einsum("nkd,nk->nd", y_nkd.astype(jnp.float32), gates_nk.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(pol.out_dtype)


# Grouped matmuls: rows sorted by expert, group sizes (E,) -> (R, D). Rows past sum(group sizes) belong to no
# expert and come back as zeros (the padding of the expert-parallel receive buffer).


def _ffn_ragged(x_rd: jax.Array, sizes_e: jax.Array, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
    pol = ctx.policy
    h = jax.nn.silu(ragged_dot(x_rd, w.w_gate, sizes_e, pol)) * ragged_dot(x_rd, w.w_up, sizes_e, pol)
    return ragged_dot(h, w.w_down, sizes_e, pol)


# Weights one step of `block_matmul` may gather: each block of rows needs its expert's whole (D, F) matrix, so
# gathering them for every block at once costs num_blocks x D x F (for DeepSeek-V3's 8K-block micro-batches,
# hundreds of GB). Past this budget the blocks are processed in chunks whose gathered weights fit in it.
BLOCK_WEIGHT_BUDGET_BYTES = 256 * 2**20


def _blocks_per_chunk(num_blocks: int, w_eio: jax.Array, budget: int) -> int:
    per_block = w_eio.shape[1] * w_eio.shape[2] * w_eio.dtype.itemsize
    return max(1, min(num_blocks, budget // per_block))


def _chunked(x: jax.Array, expert_n: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(Nb, b, i) blocks and their experts -> (C, chunk, b, i), (C, chunk), padded with empty blocks of expert 0."""
    pad = -x.shape[0] % chunk
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    expert_n = jnp.pad(expert_n, (0, pad))
    return x.reshape(-1, chunk, *x.shape[1:]), expert_n.reshape(-1, chunk)


def block_matmul(x_nbi: jax.Array, w_eio: jax.Array, expert_n: jax.Array, pol: Policy, used: jax.Array | None = None,
                 per_step: int = 0, budget: int = BLOCK_WEIGHT_BUDGET_BYTES) -> jax.Array:
    """y[n] = x[n] @ w[expert[n]] for (Nb, b, i) blocks of rows, each block owned by one expert, under the policy.
    With `per_step` > 0 and `used` (how many leading blocks hold rows; the rest are padding), a loop over chunks of
    `per_step` blocks stops after the used ones: the trailing padding blocks (a fifth of the `small` preset's) are
    not computed, and on XLA:CPU the loop beats one batched matmul even when it skips nothing. Else, within
    `budget` (see BLOCK_WEIGHT_BUDGET_BYTES), one batched matmul; past it, the same loop over every chunk of
    blocks whose weights fit in the budget. The loop's backward recomputes each chunk's VJP (the policy's own,
    FP8 included) and adds the chunk's weight gradient into one (E, i, o) accumulator, so memory stays
    O(budget + E x i x o) at any number of blocks. Outputs of skipped blocks are zeros."""
    num_blocks = x_nbi.shape[0]
    chunk = _blocks_per_chunk(num_blocks, w_eio, budget)
    if per_step and used is not None:
        chunk = min(chunk, per_step)
        steps = (used + chunk - 1) // chunk
    elif chunk >= num_blocks:
        return _chunk_product(x_nbi, expert_blocks(w_eio, expert_n), pol)
    else:
        steps = -(-num_blocks // chunk)
    return _chunked_matmul(x_nbi, w_eio, expert_n, jnp.asarray(steps, jnp.int32), pol, chunk)


@jax.custom_vjp
def expert_blocks(w_eio: jax.Array, expert_n: jax.Array) -> jax.Array:
    """w[expert[n]] (Nb, i, o) for blocks sorted by expert. Its gradient is a sorted segment sum over each expert's
    run of blocks; autodiff's transpose of the gather is an unsorted scatter-add, which XLA:CPU runs row by row."""
    return w_eio[expert_n]


def _expert_blocks_fwd(w_eio, expert_n):
    return w_eio[expert_n], (w_eio, expert_n)


def _expert_blocks_bwd(res, g_nio):
    w_eio, expert_n = res
    return _like(jax.ops.segment_sum(g_nio, expert_n, w_eio.shape[0], indices_are_sorted=True), w_eio), None


expert_blocks.defvjp(_expert_blocks_fwd, _expert_blocks_bwd)


def _chunk_product(x_cbi, w_cio, pol):
    return policy_einsum("nbi,nio->nbo", x_cbi, w_cio, pol)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_matmul(x_nbi, w_eio, expert_n, steps, pol, chunk):
    """The first `steps` chunks of `chunk` blocks (at least one), in a loop; the blocks after them are zeros. The
    first chunk runs outside the loop: its result carries the inputs' shard_map variance, a fresh zeros would not."""
    x_c, e_c = _chunked(x_nbi, expert_n, chunk)
    first = _chunk_product(x_c[0], w_eio[e_c[0]], pol)
    y_c = jnp.zeros((x_c.shape[0], *first.shape), first.dtype).at[0].set(first)
    y_c = jax.lax.fori_loop(1, steps, lambda j, y: y.at[j].set(_chunk_product(x_c[j], w_eio[e_c[j]], pol)), y_c)
    return y_c.reshape(-1, *y_c.shape[2:])[: x_nbi.shape[0]]


def _chunked_fwd(x_nbi, w_eio, expert_n, steps, pol, chunk):
    return _chunked_matmul(x_nbi, w_eio, expert_n, steps, pol, chunk), (x_nbi, w_eio, expert_n, steps)


def _chunked_bwd(pol, chunk, res, g_nbo):
    x_nbi, w_eio, expert_n, steps = res
    x_c, e_c = _chunked(x_nbi, expert_n, chunk)
    g_c, _ = _chunked(g_nbo, expert_n, chunk)

    def chunk_vjp(j):
        _, vjp = jax.vjp(lambda xx, ww: _chunk_product(xx, ww, pol), x_c[j], w_eio[e_c[j]])
        dx, dw = vjp(g_c[j].astype(pol.out_dtype))
        return dx, dw.astype(jnp.float32)

    def step(j, carry):
        dw, dx_c = carry
        dx, dw_j = chunk_vjp(j)
        return dw.at[e_c[j]].add(dw_j), dx_c.at[j].set(dx)

    dx_0, dw_0 = chunk_vjp(0)  # outside the loop, as in the forward
    init = (jnp.zeros(w_eio.shape, jnp.float32).at[e_c[0]].add(dw_0),
            jnp.zeros((x_c.shape[0], *dx_0.shape), dx_0.dtype).at[0].set(dx_0))
    dw, dx_c = jax.lax.fori_loop(1, steps, step, init)
    dx = dx_c.reshape(-1, *dx_c.shape[2:])[: x_nbi.shape[0]]
    return _like(dx, x_nbi), _like(dw, w_eio), None, None


def _varying_like(a: jax.Array, like: jax.Array) -> jax.Array:
    """`a` marked as varying over the shard_map axes `like` varies over (its gradient is psum'd over them here)."""
    extra = tuple(sorted(jax.typeof(like).manual_axis_type.varying - jax.typeof(a).manual_axis_type.varying))
    return jax.lax.pcast(a, extra, to="varying") if extra else a


def _like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent in its primal's dtype, summed over the shard_map axes it varies over and its primal does not
    (what autodiff's implicit broadcast of a replicated weight transposes to)."""
    extra = tuple(sorted(jax.typeof(ct).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying))
    return (jax.lax.psum(ct, extra) if extra else ct).astype(primal.dtype)


_chunked_matmul.defvjp(_chunked_fwd, _chunked_bwd)


def _blocks_swiglu(x_nbd: jax.Array, w: ExpertWeights, expert_b: jax.Array, used: jax.Array,
                   ctx: MoeContext) -> jax.Array:
    """The expert SwiGLU on expert-aligned blocks of rows (Nb, b, D), of which the first `used` hold rows."""
    mm = functools.partial(block_matmul, expert_n=expert_b, pol=ctx.policy, used=used, per_step=ctx.blocks_per_step)
    return mm(jax.nn.silu(mm(x_nbd, w.w_gate)) * mm(x_nbd, w.w_up), w.w_down)


def _ffn_blocked(x_rd: jax.Array, sizes_e: jax.Array, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
    """Rows scattered into expert-aligned blocks of `block` rows, the expert SwiGLU on the blocks (portable)."""
    (r, d), e, block = x_rd.shape, sizes_e.shape[0], ctx.block
    num_blocks = min(-(-r // block) + e, r)
    ends = jnp.cumsum(sizes_e)
    row = jnp.arange(r)
    expert_r = jnp.searchsorted(ends, row, side="right")  # (R,) E for rows past the last group
    blocks_e = (sizes_e + block - 1) // block
    padded_start = (jnp.cumsum(blocks_e) - blocks_e) * block
    e_r = jnp.minimum(expert_r, e - 1)
    # rows of no expert go to distinct out-of-range slots and are dropped
    dest_r = jnp.where(expert_r < e, padded_start[e_r] + row - (ends - sizes_e)[e_r], num_blocks * block + row)
    block_expert = jnp.repeat(jnp.arange(e), blocks_e, total_repeat_length=num_blocks)
    x_pd = jnp.zeros((num_blocks * block, d), x_rd.dtype).at[dest_r].set(x_rd, mode="drop", unique_indices=True)
    y_nbd = _blocks_swiglu(x_pd.reshape(num_blocks, block, d), w, block_expert, blocks_e.sum(), ctx)
    return y_nbd.reshape(num_blocks * block, d).at[dest_r].get(mode="fill", fill_value=0)


LOCAL_FFN = {"ragged_dot": _ffn_ragged, "blocked": _ffn_blocked}

# The local blocked backend places each routed row r = n*K + k straight into its slot of the expert-aligned padded
# layout (one gather from the tokens), and reads each row's result straight back from its slot (one gather), with
# gradients that are gathers too: XLA:CPU runs a scatter(-add) one row at a time. With few experts a row's rank
# within its expert comes from a cumulative sum over a (R, E) one-hot instead of a sort.
ONE_HOT_RANK_MAX = 2**22  # R * E up to which ranks come from the one-hot cumsum (16 MiB of int32), else a sort


class BlockLayout(NamedTuple):
    slot_r: jax.Array  # (R,) slot of routed row r in the padded layout (unique)
    row_p: jax.Array  # (P,) routed row in slot p; R for padding slots
    expert_b: jax.Array  # (Nb,) expert of each block, sorted
    used: jax.Array  # () how many leading blocks hold rows (the rest are padding)


def expert_ranks(idx_nk: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Each routed row r = n*K + k's rank among the rows routed to the same expert (R,), and the counts (E,),
    from a cumulative sum over an (R, E) one-hot (no sort)."""
    flat = idx_nk.reshape(-1)
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)  # (N*K, E)
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, flat[:, None], axis=1)[:, 0]
    return rank, onehot.sum(axis=0)


def block_layout(idx_nk: jax.Array, num_experts: int, block: int) -> BlockLayout:
    """Where every routed row goes when each expert's rows (in row order) fill whole blocks of `block` rows."""
    flat, e = idx_nk.reshape(-1), num_experts
    r = flat.shape[0]
    num_blocks = min(-(-r // block) + e, r)
    if r * e <= ONE_HOT_RANK_MAX:
        rank_r, sizes_e = expert_ranks(idx_nk, e)
    else:
        order = jnp.argsort(flat, stable=True)
        sizes_e = jnp.bincount(flat, length=e).astype(jnp.int32)
        rank_sorted = jnp.arange(r, dtype=jnp.int32) - (jnp.cumsum(sizes_e) - sizes_e)[flat[order]]
        rank_r = jnp.zeros((r,), jnp.int32).at[order].set(rank_sorted, unique_indices=True)
    blocks_e = (sizes_e + block - 1) // block
    slot_r = ((jnp.cumsum(blocks_e) - blocks_e) * block)[flat] + rank_r
    row_p = jnp.full((num_blocks * block,), r, jnp.int32).at[slot_r].set(jnp.arange(r, dtype=jnp.int32),
                                                                        unique_indices=True)
    expert_b = jnp.repeat(jnp.arange(e, dtype=jnp.int32), blocks_e, total_repeat_length=num_blocks)
    return BlockLayout(slot_r, row_p, expert_b, blocks_e.sum())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dispatch_rows(x_nd: jax.Array, layout: BlockLayout, k: int) -> jax.Array:
    """x_pd[p] = x_nd[row_p[p] // K] (zeros in padding slots); the gradient sums each token's K slots."""
    return x_nd.at[layout.row_p // k].get(mode="fill", fill_value=0)


def _dispatch_fwd(x_nd, layout, k):
    return dispatch_rows(x_nd, layout, k), layout


def _dispatch_bwd(k, layout, g_pd):
    return g_pd[layout.slot_r].reshape(-1, k, g_pd.shape[1]).sum(1), None


dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def collect_rows(y_pd: jax.Array, layout: BlockLayout) -> jax.Array:
    """y_rd[r] = y_pd[slot_r[r]]; the gradient puts each row back in its slot (zeros in padding slots)."""
    return y_pd[layout.slot_r]


def _collect_fwd(y_pd, layout):
    return y_pd[layout.slot_r], layout


def _collect_bwd(layout, g_rd):
    return g_rd.at[layout.row_p].get(mode="fill", fill_value=0), None


collect_rows.defvjp(_collect_fwd, _collect_bwd)


def _blocked_backend(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
    """Blocked grouped matmuls with gather-only dispatch and combine (`block_layout`)."""
    (n, k), d = routing.idx_nk.shape, x_nd.shape[1]
    layout = block_layout(routing.idx_nk, w.w_gate.shape[0], ctx.block)
    x_nbd = dispatch_rows(x_nd, layout, k).reshape(-1, ctx.block, d)
    y_pd = _blocks_swiglu(x_nbd, w, layout.expert_b, layout.used, ctx).reshape(-1, d)
    return combine(collect_rows(y_pd, layout).reshape(n, k, d), routing.gates_nk, ctx.policy)


def _sort_rows(idx_nk: jax.Array, num_experts: int):
    """Routed rows r = n*K + k sorted by expert: (order (R,), sorted experts (R,), group sizes (E,))."""
    flat = idx_nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, flat[order], jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def _unsort_combine(y_rd: jax.Array, order: jax.Array, routing: Routing, pol: Policy) -> jax.Array:
    n, k = routing.idx_nk.shape
    y_nkd = y_rd[jnp.argsort(order)].reshape(n, k, -1)
    return combine(y_nkd, routing.gates_nk, pol)


def _local_backend(ffn):
    def backend(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
        k = routing.idx_nk.shape[1]
        order, _, sizes = _sort_rows(routing.idx_nk, w.w_gate.shape[0])
        return _unsort_combine(ffn(x_nd[order // k], sizes, w, ctx), order, routing, ctx.policy)

    return backend


def _dense_backend(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
    """Every expert on every token: a reference, never the training path."""
    pol, e = ctx.policy, w.w_gate.shape[0]
    h = jax.nn.silu(policy_einsum("nd,edf->nef", x_nd, w.w_gate, pol)) * policy_einsum("nd,edf->nef", x_nd,
                                                                                      w.w_up, pol)
    y_ned = policy_einsum("nef,efd->ned", h, w.w_down, pol)
    sel_nke = jax.nn.one_hot(routing.idx_nk, e, dtype=jnp.float32)
    y_nkd = jnp.einsum("ned,nke->nkd", y_ned.astype(jnp.float32), sel_nke, precision=jax.lax.Precision.HIGHEST)
    return combine(y_nkd, routing.gates_nk, pol)


def _every_expert(x_nd: jax.Array, routing: Routing, w: ExpertWeights, pol: Policy) -> jax.Array:
    """Every expert on every token, batched over experts (no weight transpose); each token's K outputs gathered."""
    n, e = x_nd.shape[0], w.w_gate.shape[0]
    x_end = jnp.broadcast_to(x_nd, (e, *x_nd.shape))
    h_enf = jax.nn.silu(policy_einsum("end,edf->enf", x_end, w.w_gate, pol)) * policy_einsum(
        "end,edf->enf", x_end, w.w_up, pol)
    y_end = policy_einsum("enf,efd->end", h_enf, w.w_down, pol)
    return combine(y_end[routing.idx_nk, jnp.arange(n)[:, None]], routing.gates_nk, pol)


def _with_capacity(x_nd: jax.Array, routing: Routing, w: ExpertWeights, pol: Policy, rank: jax.Array,
                   cap: int) -> jax.Array:
    """Each expert on its own tokens only, gathered expert-major into `cap` slots (E, cap, D): the batched matmuls
    read every expert's weights in place, as `_every_expert`, for cap/N of its work. Exact when no expert has more
    than `cap` pairs (the caller checks); empty slots read a zero row."""
    (n, d), (_, k), e = x_nd.shape, routing.idx_nk.shape, w.w_gate.shape[0]
    flat = routing.idx_nk.reshape(-1)
    token = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
    slot_token = jnp.full((e, cap), n, jnp.int32).at[flat, rank].set(token, mode="drop")  # n: the zero row
    x_ecd = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])[slot_token]
    h_ecf = jax.nn.silu(policy_einsum("ecd,edf->ecf", x_ecd, w.w_gate, pol)) * policy_einsum(
        "ecd,edf->ecf", x_ecd, w.w_up, pol)
    y_ecd = policy_einsum("ecf,efd->ecd", h_ecf, w.w_down, pol)
    return combine(y_ecd[flat, rank].reshape(n, k, d), routing.gates_nk, pol)


def _decode_backend(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
    """For a handful of tokens (decoding), without the training dispatch. While N*K < E, each (token, choice)
    pair slices its expert's three matrices out of the stack and applies them as plain vector-matrix products,
    reading N*K expert matrices and no sort, padding or scatter (a gathered (N, K, D, F) batched einsum is ~3x
    slower on XLA:CPU). From N*K >= E on every expert is read anyway, and the experts run batched over the stack:
    on twice the mean number of pairs per expert (`_with_capacity`) when no expert got more than that, else on
    every token (`_every_expert`); the test is one conditional per layer, so the result is exact either way."""
    n, k = routing.idx_nk.shape
    pol, e = ctx.policy, w.w_gate.shape[0]
    if n * k >= e:
        cap = 2 * -(-n * k // e)
        if cap >= n:
            return _every_expert(x_nd, routing, w, pol)
        rank, counts = expert_ranks(routing.idx_nk, e)
        return jax.lax.cond(counts.max() <= cap, lambda: _with_capacity(x_nd, routing, w, pol, rank, cap),
                            lambda: _every_expert(x_nd, routing, w, pol))

    def expert(x_d, e):
        w_df = [jax.lax.dynamic_index_in_dim(m, e, keepdims=False) for m in w]
        h_f = jax.nn.silu(policy_einsum("d,df->f", x_d, w_df[0], pol)) * policy_einsum("d,df->f", x_d, w_df[1], pol)
        return policy_einsum("f,fd->d", h_f, w_df[2], pol)

    y_nkd = jnp.stack([jnp.stack([expert(x_nd[i], routing.idx_nk[i, j]) for j in range(k)]) for i in range(n)])
    return combine(y_nkd, routing.gates_nk, pol)


# Expert parallelism. Inside shard_map each device sorts its own routed rows by expert (hence by destination
# shard), sends chunk j to shard j, runs its E_l experts on what it received and sends the results back to where
# they came from. Both exchanges have the semantics of `jax.lax.ragged_all_to_all` and take the same offsets from
# `exchange_plans`; `ragged_exchange` is that collective (TPU/GPU), `all_to_all_exchange` reproduces it with a
# dense all_to_all of fixed capacity (runs everywhere, including XLA:CPU, which lacks the ragged collective).


class ExchangePlan(NamedTuple):
    input_offsets: jax.Array  # (S,) where chunk j starts in the operand
    send_sizes: jax.Array  # (S,) rows of chunk j
    output_offsets: jax.Array  # (S,) where chunk j lands in device j's output
    recv_sizes: jax.Array  # (S,) rows received from device s


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def exchange_plans(sizes_sj: jax.Array, me: jax.Array) -> tuple[ExchangePlan, ExchangePlan]:
    """Offsets of the dispatch and the return exchange for device `me`, from sizes_sj[s, j] = rows device s sends
    to device j (every device's send sizes). Received rows are packed in sender order from row 0."""
    send, recv = sizes_sj[me], sizes_sj[:, me]
    forward = ExchangePlan(_exclusive_cumsum(send), send, _exclusive_cumsum(sizes_sj, 0)[me], recv)
    back = ExchangePlan(_exclusive_cumsum(recv), recv, _exclusive_cumsum(sizes_sj, 1)[:, me], send)
    return forward, back


def ragged_exchange(operand, output, plan: ExchangePlan, axes: tuple[str, ...], capacity: int):
    """The plan as one `jax.lax.ragged_all_to_all` (moves only the routed rows)."""
    del capacity
    return jax.lax.ragged_all_to_all(operand, output, plan.input_offsets, plan.send_sizes, plan.output_offsets,
                                     plan.recv_sizes, axis_name=axes)


def all_to_all_exchange(operand, output, plan: ExchangePlan, axes: tuple[str, ...], capacity: int):
    """`ragged_exchange`'s result from a dense `jax.lax.all_to_all` of `capacity` rows per peer: each chunk is
    padded to capacity, exchanged, and written at the offset its sender chose. Exact for chunks <= capacity."""
    s, c = plan.send_sizes.shape[0], jnp.arange(capacity)
    tail = (1,) * (operand.ndim - 1)
    rows = plan.input_offsets[:, None] + c  # (S, C)
    keep = (c < plan.send_sizes[:, None]).reshape(s, capacity, *tail)
    buf = jnp.where(keep, operand.at[rows].get(mode="fill", fill_value=0), 0)  # (S, C, ...)
    recv = jax.lax.all_to_all(buf, axes, 0, 0, tiled=True)  # recv[s]: what device s sent here
    at = jax.lax.all_to_all(plan.output_offsets, axes, 0, 0, tiled=True)  # (S,) where device s writes here
    dest = jnp.where(c < plan.recv_sizes[:, None], at[:, None] + c, output.shape[0] + jnp.arange(s * capacity)
                     .reshape(s, capacity))
    return output.at[dest.reshape(-1)].set(recv.reshape(s * capacity, *operand.shape[1:]), mode="drop",
                                           unique_indices=True)


def _expert_parallel_backend(exchange):
    def one_shot(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
        axes, (n, k), d = ctx.expert_axes, routing.idx_nk.shape, x_nd.shape[1]
        s, e_l = jax.lax.axis_size(axes), w.w_gate.shape[0]
        r = n * k
        order, sorted_e, sizes_e = _sort_rows(routing.idx_nk, s * e_l)
        send_j = sizes_e.reshape(s, e_l).sum(1)
        forward, back = exchange_plans(jax.lax.all_gather(send_j, axes), jax.lax.axis_index(axes))
        # dispatch: rows and their local expert ids (E_l marks a slot nobody filled); a shard receives <= S*R rows
        x_md = exchange(x_nd[order // k], jnp.zeros((s * r, d), x_nd.dtype), forward, axes, r)
        local_m = exchange(sorted_e % e_l, jnp.full((s * r,), e_l, jnp.int32), forward, axes, r)
        order_m = jnp.argsort(local_m, stable=True)
        sizes_l = jnp.bincount(local_m, length=e_l + 1)[:e_l].astype(jnp.int32)
        y_md = LOCAL_FFN[ctx.local](x_md[order_m], sizes_l, w, ctx)[jnp.argsort(order_m)]
        y_rd = exchange(y_md, jnp.zeros((r, d), y_md.dtype), back, axes, r)
        return _unsort_combine(y_rd, order, routing, ctx.policy)

    def backend(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
        if 0 < ctx.chunk_tokens < x_nd.shape[0]:
            return in_token_chunks(one_shot, x_nd, routing, w, ctx)
        return one_shot(x_nd, routing, w, ctx)

    return backend


def in_token_chunks(fn, x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
    """`fn` (a backend) over C chunks of at most `ctx.chunk_tokens` tokens, one after another: every buffer of
    the exchange (S*R/C receive rows instead of S*R) is live for one chunk only, and each chunk is rematerialised,
    so the backward keeps only the chunk inputs. Dropless and exact: a token's output depends on its own routed
    rows only. Padding tokens (when C does not divide N) have zero gates and are cut off."""
    n = x_nd.shape[0]
    c = -(-n // ctx.chunk_tokens)
    size = -(-n // c)

    def split(a):  # (N, ...) -> (C, N/C, ...)
        return jnp.pad(a, ((0, c * size - n),) + ((0, 0),) * (a.ndim - 1)).reshape(c, size, *a.shape[1:])

    # weights made varying like the tokens before the loop: the psum of their gradient then runs once, not per chunk
    w = ExpertWeights(*(_varying_like(a, x_nd) for a in w))
    body = jax.checkpoint(lambda xs: fn(xs[0], Routing(xs[1], xs[2]), w, ctx), prevent_cse=False)
    y_cnd = jax.lax.map(body, (split(x_nd), split(routing.idx_nk), split(routing.gates_nk)))
    return y_cnd.reshape(c * size, -1)[:n]


class Backend(NamedTuple):
    fn: Callable  # (x_nd, Routing, ExpertWeights, MoeContext) -> y_nd
    expert_parallel: bool  # runs inside shard_map on this device's tokens and experts


BACKENDS: dict[str, Backend] = {
    "dense": Backend(_dense_backend, False),
    "ragged_dot": Backend(_local_backend(_ffn_ragged), False),
    "blocked": Backend(_blocked_backend, False),
    "ep_a2a": Backend(_expert_parallel_backend(all_to_all_exchange), True),
    "ep_ragged": Backend(_expert_parallel_backend(ragged_exchange), True),
    "decode": Backend(_decode_backend, False),  # picked by `MoE(..., decoding=True)`, not by `choose`
}


def grouped_ffn(x_nd, idx_nk, gates_nk, w_gate, w_up, w_down, impl: str, block: int, pol: Policy) -> jax.Array:
    """A local backend called with plain arrays (benchmarks, tests)."""
    return BACKENDS[impl].fn(x_nd, Routing(idx_nk, gates_nk), ExpertWeights(w_gate, w_up, w_down),
                             MoeContext(pol, block))


def local_impl(platform: str) -> str:
    """The grouped matmul for this platform: ragged_dot is native only on TPU (GPU pads it to a dense matmul)."""
    return "ragged_dot" if platform == "tpu" else "blocked"


def _size(mesh, axes: tuple[str, ...]) -> int:
    out = 1
    for a in axes:
        out *= mesh.shape[a]
    return out


# Blocks per step of the blocked form's loop over its used blocks when impl.moe_blocks_per_step is None, by
# platform: on XLA:CPU the loop beats one batched matmul (MoE layer forward + backward: `small` preset -27%, bench
# config -4%); elsewhere (unmeasured) one batched matmul.
AUTO_BLOCKS_PER_STEP = {"cpu": 8}


def choose(impl: str, mesh, rules: dict, batch: int, num_experts: int, ffn: int, block: int, pol: Policy,
           platform: str, chunk_tokens: int = 0, blocks_per_step: int | None = None) -> tuple[str, MoeContext, bool]:
    """(backend name, context, whether to run inside shard_map) for `impl.moe_impl` on this mesh.

    `auto` is expert-parallel whenever the experts are split (ragged all-to-all on TPU/GPU, the dense exchange
    elsewhere), else the platform's local grouped matmul, and whenever the batch splits over the mesh it runs
    inside shard_map, so each device routes and sorts only its own tokens. A local backend named explicitly runs
    over the global batch and lets GSPMD partition it (the baseline, which gathers the whole batch's routing onto
    every device); so does everything when the batch does not split (decoding one sequence)."""
    local = local_impl(platform)
    if blocks_per_step is None:
        blocks_per_step = AUTO_BLOCKS_PER_STEP.get(platform, 0)
    ctx = MoeContext(pol, block, local, blocks_per_step=blocks_per_step)
    if mesh.empty:
        return (local if impl == "auto" else impl), ctx, False
    ep_axes, batch_axes = mesh_axes("experts", rules), mesh_axes("batch", rules)
    ep = _size(mesh, ep_axes)
    auto = impl == "auto"
    if auto:
        impl = ("ep_ragged" if platform in ("gpu", "tpu", "cuda", "rocm") else "ep_a2a") if ep > 1 else local
    if batch % _size(mesh, batch_axes) or not (auto or BACKENDS[impl].expert_parallel):
        return (local if BACKENDS[impl].expert_parallel else impl), ctx, False
    ffn_axes = tuple(a for a in mesh_axes("expert_mlp", rules)
                     if a not in batch_axes and a not in ep_axes and mesh.shape[a] > 1)
    ctx = dataclasses.replace(ctx, ffn_axes=ffn_axes if ffn % _size(mesh, ffn_axes) == 0 else ())
    if not BACKENDS[impl].expert_parallel:
        return impl, ctx, True
    if num_experts % ep:
        raise ConfigError(f"model.n_routed_experts ({num_experts}) is not divisible by the expert-parallel size "
                          f"{ep} (mesh {'*'.join(ep_axes)})")
    if not set(ep_axes) <= set(batch_axes):
        raise ConfigError(f"impl.moe_impl={impl} needs the expert mesh axes {ep_axes} among the batch axes "
                          f"{batch_axes} (mesh.rules)")
    return impl, dataclasses.replace(ctx, expert_axes=ep_axes, chunk_tokens=chunk_tokens), True


# ----------------------------------------------------------------------------------------------------------------
# The layer.


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
        normalised affinities s_i / sum_j s_j, for the batch-level aux loss} over valid tokens, all over the whole
        global batch (psum'd once across the shards under expert parallelism). `decoding` (on the cache): a handful
        of tokens and no mesh take the `decode` backend instead of the training dispatch (`decodes`)."""
        cfg = self.cfg
        mesh, rules = jax.sharding.get_abstract_mesh(), current_rules()
        if decoding and decodes(x_btd.shape[0] * x_btd.shape[1]):
            name, ctx, sharded = "decode", MoeContext(self.policy), False
        else:
            name, ctx, sharded = choose(self.impl.moe_impl, mesh, rules, x_btd.shape[0], cfg.n_routed_experts,
                                        cfg.moe_intermediate_size, self.impl.moe_block_size, self.policy,
                                        jax.default_backend(), self.impl.moe_ep_chunk_tokens,
                                        self.impl.moe_blocks_per_step)
        weights = ExpertWeights(self.w_gate[...], self.w_up[...], self.w_down[...])
        routed = functools.partial(_routed, cfg=cfg, backend=BACKENDS[name].fn, ctx=ctx)
        args = (x_btd, valid_bt, self.router[...], self.bias[...], weights)
        if sharded:
            bat, e, f = mesh_axes("batch", rules), ctx.expert_axes or None, ctx.ffn_axes or None
            w_in, w_out = P(e, None, f), P(e, f, None)
            routed = jax.shard_map(functools.partial(routed, reduce_axes=bat), mesh=mesh,
                                   in_specs=(P(bat), P(bat), P(), P(), ExpertWeights(w_in, w_in, w_out)),
                                   out_specs=(P(bat), P(), P(), P()))
        y_btd, counts, balance, affinity = routed(*args)
        y_btd = y_btd.astype(x_btd.dtype)
        if self.shared is not None:
            y_btd = y_btd + self.shared(x_btd)
        return y_btd, {"expert_counts": counts, "balance_loss": balance, "expert_affinity": affinity}


def _routed(x_btd, valid_bt, router_de, bias_e, weights: ExpertWeights, *, cfg: ModelConfig, backend, ctx,
            reduce_axes: tuple[str, ...] = ()):
    """Route these tokens, run the backend, count: (y (B, T, D), expert counts (E,), balance loss (), affinity sum
    (E,)). Inside shard_map the counts and the balance-loss and affinity sums are psum'd over the batch axes."""
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    scores = router_scores(x_nd, router_de)  # (N, E) float32
    idx, gates = select_experts(scores, bias_e, cfg)
    y_nd = backend(x_nd, Routing(idx, gates), weights, ctx)
    if ctx.ffn_axes:  # each device computed its slice of every expert's hidden width: partial sums
        y_nd = jax.lax.psum(y_nd, ctx.ffn_axes)
    counts = expert_counts(idx, valid_bt.reshape(-1), cfg.n_routed_experts)
    bal_sum, n_seq = sequence_balance_terms(scores.reshape(b, t, -1), idx.reshape(b, t, -1), valid_bt,
                                            cfg.num_experts_per_tok)
    affinity = ((scores / scores.sum(-1, keepdims=True)) * valid_bt.reshape(-1, 1)).sum(0)  # (E,)
    if reduce_axes:
        counts, bal_sum, n_seq, affinity = jax.lax.psum((counts, bal_sum, n_seq, affinity), reduce_axes)
    return y_nd.reshape(b, t, d), counts, bal_sum / jnp.maximum(n_seq, 1.0), affinity


# The decode path: a handful of tokens on the latent cache (`MoE(..., decoding=True)`). Same routing, same aux; the
# `decode` backend instead of the training dispatch.
DECODE_MAX_TOKENS = 64


def decodes(n_tokens: int) -> bool:
    """Whether the decode path takes `n_tokens` tokens: few of them, and no mesh (under a mesh the layer's own
    sharded dispatch stays in charge)."""
    return n_tokens <= DECODE_MAX_TOKENS and jax.sharding.get_abstract_mesh().empty

