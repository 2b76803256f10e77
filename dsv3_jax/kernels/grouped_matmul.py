"""The grouped matmul of the MoE in pure JAX: routed rows laid out in expert-aligned blocks, a batched matmul over
the blocks, and the custom VJPs that keep its backward a sorted segment sum and gathers (XLA:CPU runs scatters
one row at a time).

Legend: R routed rows (N*K), E experts, Nb blocks of b rows, i / o a block's input / output width, P padded rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.kernels.precision import Policy
from dsv3_jax.kernels.precision import einsum as policy_einsum
from dsv3_jax.kernels.shapes import cdiv
from dsv3_jax.kernels.varying import varying_axes

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
                 per_step: int = 0, budget: int | None = None) -> jax.Array:
    """y[n] = x[n] @ w[expert[n]] for (Nb, b, i) blocks of rows, each block owned by one expert, under the policy.
    With `per_step` > 0 and `used` (how many leading blocks hold rows; the rest are padding), a loop over chunks of
    `per_step` blocks stops after the used ones: the trailing padding blocks are not computed, and on XLA:CPU the
    loop beats one batched matmul even when it skips nothing. Else, within `budget` (default
    BLOCK_WEIGHT_BUDGET_BYTES), one batched matmul; past it, the same loop over every chunk of blocks whose weights
    fit in the budget. The loop's backward recomputes each chunk's VJP (the policy's own,
    FP8 included) and adds the chunk's weight gradient into one (E, i, o) accumulator, so memory stays
    O(budget + E x i x o) at any number of blocks. Outputs of skipped blocks are zeros."""
    num_blocks = x_nbi.shape[0]
    chunk = _blocks_per_chunk(num_blocks, w_eio, BLOCK_WEIGHT_BUDGET_BYTES if budget is None else budget)
    if per_step and used is not None:
        chunk = min(chunk, per_step)
        steps = cdiv(used, chunk)
    elif chunk >= num_blocks:
        return _chunk_product(x_nbi, expert_blocks(w_eio, expert_n), pol)
    else:
        steps = cdiv(num_blocks, chunk)
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


def _like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent in its primal's dtype, summed over the shard_map axes it varies over and its primal does not
    (what autodiff's implicit broadcast of a replicated weight transposes to)."""
    extra = tuple(sorted(set(varying_axes(jax.typeof(ct))) - set(varying_axes(jax.typeof(primal)))))
    return (jax.lax.psum(ct, extra) if extra else ct).astype(primal.dtype)


_chunked_matmul.defvjp(_chunked_fwd, _chunked_bwd)


# The local blocked backend places each routed row r = n*K + k straight into its slot of the expert-aligned padded
# layout (one gather from the tokens), and reads each row's result straight back from its slot (one gather), with
# gradients that are gathers too: XLA:CPU runs a scatter(-add) one row at a time. With few experts a row's rank
# within its expert comes from a cumulative sum over a (R, E) one-hot instead of a sort.
ONE_HOT_RANK_MAX = 2**22  # R * E up to which ranks come from the one-hot cumsum (16 MiB of int32), else a sort


class BlockGrid(NamedTuple):
    start_e: jax.Array  # (E,) first slot of each expert's rows in the padded layout
    expert_b: jax.Array  # (Nb,) expert of each block, sorted
    used: jax.Array  # () how many leading blocks hold rows (the rest are padding)


def block_grid(sizes_e: jax.Array, rows: int, block: int) -> BlockGrid:
    """The expert-aligned blocks of `block` rows for `rows` rows of which sizes_e[e] go to expert e, each expert's
    rows starting a new block. Their number Nb is static: each expert adds at most one partial block to
    cdiv(rows, block), and no more blocks than rows can hold a row."""
    e = sizes_e.shape[0]
    num_blocks = min(cdiv(rows, block) + e, rows)
    blocks_e = cdiv(sizes_e, block)
    expert_b = jnp.repeat(jnp.arange(e, dtype=jnp.int32), blocks_e, total_repeat_length=num_blocks)
    return BlockGrid((jnp.cumsum(blocks_e) - blocks_e) * block, expert_b, blocks_e.sum())


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


def sort_rows(idx_nk: jax.Array, num_experts: int):
    """Routed rows r = n*K + k sorted by expert: (order (R,), sorted experts (R,), group sizes (E,))."""
    flat = idx_nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, flat[order], jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def block_layout(idx_nk: jax.Array, num_experts: int, block: int) -> BlockLayout:
    """Where every routed row goes when each expert's rows (in row order) fill whole blocks of `block` rows."""
    flat, e = idx_nk.reshape(-1), num_experts
    r = flat.shape[0]
    if r * e <= ONE_HOT_RANK_MAX:
        rank_r, sizes_e = expert_ranks(idx_nk, e)
    else:
        order, sorted_e, sizes_e = sort_rows(idx_nk, e)
        rank_sorted = jnp.arange(r, dtype=jnp.int32) - (jnp.cumsum(sizes_e) - sizes_e)[sorted_e]
        rank_r = jnp.zeros((r,), jnp.int32).at[order].set(rank_sorted, unique_indices=True)
    grid = block_grid(sizes_e, r, block)
    slot_r = grid.start_e[flat] + rank_r
    row_p = jnp.full((grid.expert_b.shape[0] * block,), r, jnp.int32).at[slot_r].set(
        jnp.arange(r, dtype=jnp.int32), unique_indices=True)
    return BlockLayout(slot_r, row_p, grid.expert_b, grid.used)


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
