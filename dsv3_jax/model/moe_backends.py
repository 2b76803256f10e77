"""The expert-FFN backends, one registry and one signature:
    backend(x_nd, routing, weights, ctx) -> y_nd = sum_k gate_k * Expert_{idx_k}(x_n)

`dense` (every expert on every token, the reference), `ragged_dot` and `blocked` (grouped matmuls over rows sorted
by expert), `decode` (a handful of tokens on the cache) and the expert-parallel `ep_ragged` / `ep_a2a`, which run
inside `jax.shard_map` on this device's tokens and its E_l experts: rows sorted by expert are sent to the shard
holding the expert (parallel/expert_parallel.py), computed there by the local grouped matmul, and sent back.
All-gathering tokens within the expert group was rejected: on an expert-only mesh it gathers the whole batch onto
every device.

Legend: N tokens, E routed experts, K experts per token, D hidden size, F expert hidden size, R = N*K routed rows,
S expert-parallel shards, E_l = E/S experts per shard, M = S*R rows a shard can receive.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.kernels.fp8 import pack_rows, packed_width, unpack_rows
from dsv3_jax.kernels.grouped_matmul import (
    block_grid,
    block_layout,
    block_matmul,
    collect_rows,
    dispatch_rows,
    sort_rows,
)
from dsv3_jax.kernels.precision import Policy, ragged_dot
from dsv3_jax.kernels.precision import einsum as policy_einsum
from dsv3_jax.kernels.shapes import cdiv, group_of_rows
from dsv3_jax.kernels.varying import like
from dsv3_jax.model.routing import Routing
from dsv3_jax.parallel.expert_parallel import (
    ExchangePlan,
    all_to_all_exchange,
    exchange_plans,
    pair_capacity,
    ragged_exchange,
)


class ExpertWeights(NamedTuple):
    w_gate: jax.Array  # (E, D, F)
    w_up: jax.Array  # (E, D, F)
    w_down: jax.Array  # (E, F, D)


@dataclasses.dataclass(frozen=True)
class MoeContext:
    """What a backend needs besides data: the precision policy, the blocked form's block size, and for the
    expert-parallel backends the local grouped matmul, the mesh axes (experts split over `expert_axes`, the
    expert hidden width F over `ffn_axes`, whose partial outputs are psum'd) and how many tokens one exchange
    carries at most (`chunk_tokens`, 0 = all of this device's tokens at once) and how many rows may go to one
    peer (`capacity_factor`). `blocks_per_step`: see `block_matmul`."""

    policy: Policy = Policy()
    block: int = 32
    local: str = "blocked"
    expert_axes: tuple[str, ...] = ()
    ffn_axes: tuple[str, ...] = ()
    token_split_axes: tuple[str, ...] = ()  # expert axes over which the tokens are replicated (`split_tokens`)
    chunk_tokens: int = 0
    capacity_factor: float | None = None  # rows per peer per exchange (expert_parallel.pair_capacity); None: all
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


def _blocks_swiglu(x_nbd: jax.Array, w: ExpertWeights, expert_b: jax.Array, used: jax.Array,
                   ctx: MoeContext) -> jax.Array:
    """The expert SwiGLU on expert-aligned blocks of rows (Nb, b, D), of which the first `used` hold rows."""
    mm = functools.partial(block_matmul, expert_n=expert_b, pol=ctx.policy, used=used, per_step=ctx.blocks_per_step)
    return mm(jax.nn.silu(mm(x_nbd, w.w_gate)) * mm(x_nbd, w.w_up), w.w_down)


def _ffn_blocked(x_rd: jax.Array, sizes_e: jax.Array, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
    """Rows scattered into expert-aligned blocks of `block` rows, the expert SwiGLU on the blocks (portable)."""
    (r, d), e, block = x_rd.shape, sizes_e.shape[0], ctx.block
    grid = block_grid(sizes_e, r, block)
    slots = grid.expert_b.shape[0] * block
    ends = jnp.cumsum(sizes_e)
    row = jnp.arange(r)
    expert_r = group_of_rows(sizes_e, r)  # (R,) E for rows past the last group
    e_r = jnp.minimum(expert_r, e - 1)
    # rows of no expert go to distinct out-of-range slots and are dropped
    dest_r = jnp.where(expert_r < e, grid.start_e[e_r] + row - (ends - sizes_e)[e_r], slots + row)
    x_pd = jnp.zeros((slots, d), x_rd.dtype).at[dest_r].set(x_rd, mode="drop", unique_indices=True)
    y_nbd = _blocks_swiglu(x_pd.reshape(-1, block, d), w, grid.expert_b, grid.used, ctx)
    return y_nbd.reshape(slots, d).at[dest_r].get(mode="fill", fill_value=0)


LOCAL_FFN = {"ragged_dot": _ffn_ragged, "blocked": _ffn_blocked}


def _blocked_backend(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
    """Blocked grouped matmuls with gather-only dispatch and combine (`block_layout`)."""
    (n, k), d = routing.idx_nk.shape, x_nd.shape[1]
    layout = block_layout(routing.idx_nk, w.w_gate.shape[0], ctx.block)
    x_nbd = dispatch_rows(x_nd, layout, k).reshape(-1, ctx.block, d)
    y_pd = _blocks_swiglu(x_nbd, w, layout.expert_b, layout.used, ctx).reshape(-1, d)
    return combine(collect_rows(y_pd, layout).reshape(n, k, d), routing.gates_nk, ctx.policy)


def _unsort_combine(y_rd: jax.Array, order: jax.Array, routing: Routing, pol: Policy) -> jax.Array:
    n, k = routing.idx_nk.shape
    y_nkd = y_rd[jnp.argsort(order)].reshape(n, k, -1)
    return combine(y_nkd, routing.gates_nk, pol)


def _local_backend(ffn):
    def backend(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
        k = routing.idx_nk.shape[1]
        order, _, sizes = sort_rows(routing.idx_nk, w.w_gate.shape[0])
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


# Rows per expert-aligned block on the decode path: on XLA:CPU at 16-128 decode tokens of the `bench` model (E 16,
# K 4) blocks of 8 taken one per loop step beat 4, 16 and 32, several blocks a step, and the experts batched over
# the stack on a capacity (docs/performance.md#decode).
DECODE_BLOCK = 8


def _decode_backend(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> jax.Array:
    """For a handful of tokens (decoding), without the training dispatch. While N*K < E, each (token, choice)
    pair slices its expert's three matrices out of the stack and applies them as plain vector-matrix products,
    reading N*K expert matrices and no sort, padding or scatter (a gathered (N, K, D, F) batched einsum is slower
    on XLA:CPU). From N*K >= E on (a batch, or a speculative verify step's 2 tokens a row) the pairs go into
    expert-aligned blocks of DECODE_BLOCK rows (`_blocked_backend`) and a loop runs the used blocks only: each
    expert some token picked is read from memory once for all of its rows and no expert runs on a token that did
    not pick it, however skewed the routing (a decode batch often sends most tokens to a few experts: a per-expert
    capacity then has to grow to N, every expert on every token). Dropless, so exact."""
    n, k = routing.idx_nk.shape
    pol, e = ctx.policy, w.w_gate.shape[0]
    if n * k >= e:
        return _blocked_backend(x_nd, routing, w, dataclasses.replace(ctx, block=DECODE_BLOCK, blocks_per_step=1))

    def expert(x_d, e):
        w_df = [jax.lax.dynamic_index_in_dim(m, e, keepdims=False) for m in w]
        h_f = jax.nn.silu(policy_einsum("d,df->f", x_d, w_df[0], pol)) * policy_einsum("d,df->f", x_d, w_df[1], pol)
        return policy_einsum("f,fd->d", h_f, w_df[2], pol)

    y_nkd = jnp.stack([jnp.stack([expert(x_nd[i], routing.idx_nk[i, j]) for j in range(k)]) for i in range(n)])
    return combine(y_nkd, routing.gates_nk, pol)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 2))
def fp8_dispatch(send, x_rd: jax.Array, m: int, forward: ExchangePlan, back: ExchangePlan) -> jax.Array:
    """The dispatch of rows as E4M3 bytes with float32 scales per 1x128 tile (`fp8.pack_rows`): (R, D) -> the
    (M, D) float32 rows received. The expert GEMM quantises them again to the same E4M3 values. Straight-through:
    the gradient of the rows is the received gradient sent back (the return exchange, in the rows' dtype)."""
    d = x_rd.shape[1]
    return unpack_rows(send(pack_rows(x_rd), jnp.zeros((m, packed_width(d)), jnp.uint8), forward), d)


def _fp8_dispatch_fwd(send, x_rd, m, forward, back):
    return fp8_dispatch(send, x_rd, m, forward, back), (jnp.zeros((0,), x_rd.dtype), x_rd.shape, forward, back)


def _fp8_dispatch_bwd(send, m, res, dx_md):
    like_x, shape, forward, back = res
    dx_rd = send(dx_md.astype(like_x.dtype), jnp.zeros(shape, like_x.dtype), back)
    return dx_rd, None, None


fp8_dispatch.defvjp(_fp8_dispatch_fwd, _fp8_dispatch_bwd)


def _expert_parallel_backend(exchange):
    def one_shot(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> tuple[jax.Array, jax.Array]:
        axes, (n, k), d = ctx.expert_axes, routing.idx_nk.shape, x_nd.shape[1]
        s, e_l = jax.lax.axis_size(axes), w.w_gate.shape[0]
        r = n * k
        cap = pair_capacity(r, s, ctx.capacity_factor)  # rows per peer: receive buffers hold S * cap rows
        order, sorted_e, sizes_e = sort_rows(routing.idx_nk, s * e_l)
        send_j = sizes_e.reshape(s, e_l).sum(1)
        forward, back = exchange_plans(jax.lax.all_gather(send_j, axes), jax.lax.axis_index(axes),
                                       None if cap == r else cap)
        # dispatch: rows and their local expert ids (E_l marks a slot nobody filled); a shard receives <= S*R rows.
        # Under bf16 the rows travel both ways in bf16, as the expert matmuls read them and as DeepSeek combines
        # (half the bytes of float32); under fp8 they go as E4M3 bytes with their 1x128 scales (as DeepSeek
        # dispatches) and come back as bf16; fp32 keeps float32
        narrow = ctx.policy.precision in ("bf16", "fp8")
        x_nd = x_nd.astype(ctx.policy.compute_dtype) if ctx.policy.precision == "bf16" else x_nd
        send = functools.partial(exchange, axes=axes, capacity=cap)
        if ctx.policy.precision == "fp8":
            x_md = fp8_dispatch(send, x_nd[order // k], s * cap, forward, back)
        else:
            x_md = send(x_nd[order // k], jnp.zeros((s * cap, d), x_nd.dtype), forward)
        local_m = exchange(sorted_e % e_l, jnp.full((s * cap,), e_l, jnp.int32), forward, axes, cap)
        order_m, _, sizes_m = sort_rows(local_m, e_l + 1)  # unfilled slots (id E_l) sort last, past every group
        y_md = LOCAL_FFN[ctx.local](x_md[order_m], sizes_m[:e_l], w, ctx)[jnp.argsort(order_m)]
        y_md = y_md.astype(ctx.policy.compute_dtype) if narrow else y_md
        y_rd = exchange(y_md, jnp.zeros((r, d), y_md.dtype), back, axes, cap)  # dropped rows stay 0
        return _unsort_combine(y_rd, order, routing, ctx.policy), r - forward.send_sizes.sum()

    def backend(x_nd: jax.Array, routing: Routing, w: ExpertWeights, ctx: MoeContext) -> tuple[jax.Array, jax.Array]:
        if 0 < ctx.chunk_tokens < x_nd.shape[0]:
            return in_token_chunks(one_shot, x_nd, routing, w, ctx)
        return one_shot(x_nd, routing, w, ctx)

    return backend


def in_token_chunks(fn, x_nd: jax.Array, routing: Routing, w: ExpertWeights,
                    ctx: MoeContext) -> tuple[jax.Array, jax.Array]:
    """`fn` (a backend) over C chunks of at most `ctx.chunk_tokens` tokens, one after another: every buffer of
    the exchange (S*R/C receive rows instead of S*R) is live for one chunk only, and each chunk is rematerialised,
    so the backward keeps only the chunk inputs. Dropless and exact: a token's output depends on its own routed
    rows only. Padding tokens (when C does not divide N) have zero gates and are cut off."""
    n = x_nd.shape[0]
    c = cdiv(n, ctx.chunk_tokens)
    size = cdiv(n, c)

    def split(a):  # (N, ...) -> (C, N/C, ...)
        return jnp.pad(a, ((0, c * size - n),) + ((0, 0),) * (a.ndim - 1)).reshape(c, size, *a.shape[1:])

    # weights made varying like the tokens before the loop: the psum of their gradient then runs once, not per chunk
    w = ExpertWeights(*(like(a, x_nd) for a in w))
    body = jax.checkpoint(lambda xs: fn(xs[0], Routing(xs[1], xs[2]), w, ctx), prevent_cse=False)
    y_cnd, dropped_c = jax.lax.map(body, (split(x_nd), split(routing.idx_nk), split(routing.gates_nk)))
    return y_cnd.reshape(c * size, -1)[:n], dropped_c.sum()


def split_tokens(fn, x_nd: jax.Array, routing: Routing, w: ExpertWeights,
                 ctx: MoeContext) -> tuple[jax.Array, jax.Array]:
    """`fn` (an expert-parallel backend) on this device's 1/T of the N tokens that the T devices of
    `ctx.token_split_axes` share, the T results gathered back: each routed row is exchanged and computed once,
    not T times. Padding tokens (when T does not divide N) have zero gates and are cut off."""
    axes, n = ctx.token_split_axes, x_nd.shape[0]
    size = cdiv(n, jax.lax.axis_size(axes))
    start = jax.lax.axis_index(axes) * size

    def mine(a):  # (N, ...) -> this device's (N/T, ...)
        a = jnp.pad(a, ((0, size * jax.lax.axis_size(axes) - n),) + ((0, 0),) * (a.ndim - 1))
        return jax.lax.dynamic_slice_in_dim(a, start, size)

    y, dropped = fn(mine(x_nd), Routing(mine(routing.idx_nk), mine(routing.gates_nk)), w, ctx)
    return jax.lax.all_gather(y, axes, tiled=True, to="invarying")[:n], jax.lax.psum(dropped, axes)


class Backend(NamedTuple):
    fn: Callable  # (x_nd, Routing, ExpertWeights, MoeContext) -> y_nd; expert-parallel: (y_nd, rows dropped)
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
