"""FP8 training GEMMs (precision "fp8", DeepSeek-V3's recipe): every GEMM of a linear layer (forward, activation
gradient, weight gradient) takes E4M3 operands.

The left operand is scaled per 1x128 tile along the contraction, the weight per 128x128 block, the output gradient
of the weight-gradient GEMM per 128x1 tile along the tokens; scale = amax / 448 of the tile, computed every step.
Each 128-wide contraction chunk is its own dot with float32 output and the chunks are summed in float32 (promotion
every 128 elements). Tiles: a contraction dim K >= 128 is cut into 128-wide chunks and zero-padded to a multiple of
128 (the edge tile is partial); K < 128 is one 1xK tile. Linear layers with K < config.FP8_MIN_K (32) are refused
at config validation (config.fp8_contraction_dims).

Legend: G batch (einsum batch dims), M rows, K contraction, N columns, C chunks of the contraction (c chunk width),
B column blocks (b block width), E experts, R grouped rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.kernels.shapes import group_of_rows, round_up
from dsv3_jax.kernels.varying import like

FP8_BLOCK = 128


FP8_MAX = 448.0  # largest finite float8_e4m3fn


FP8 = jnp.float8_e4m3fn


F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: the floor of a scale (CPUs flush subnormals)


def _chunk(k: int) -> int:
    """Width of the contraction tiles for a contraction of k elements: 128, or one tile when k < 128."""
    return min(FP8_BLOCK, k)


def _pad(a: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pad `axis` up to a multiple (zeros change neither a tile's amax nor a dot)."""
    extra = round_up(a.shape[axis], multiple) - a.shape[axis]
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def quantize(x: jax.Array, tile: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """E4M3 values and float32 scales (amax / 448) of `x` cut into tiles of shape `tile` (each dim of x a multiple
    of its tile). scale has shape x.shape // tile; an all-zero tile gets scale 1 (its values quantise to 0)."""
    split = []
    for n, t in zip(x.shape, tile, strict=True):
        split += [n // t, t]
    tiles = x.astype(jnp.float32).reshape(split)
    amax = jnp.max(jnp.abs(tiles), axis=tuple(range(1, len(split), 2)))
    scale = jnp.where(amax > 0, jnp.maximum(amax / FP8_MAX, F32_TINY), 1.0)  # never a (flushed) subnormal
    expanded = scale.reshape([d for n in scale.shape for d in (n, 1)])
    q = jnp.clip(tiles / expanded, -FP8_MAX, FP8_MAX).astype(FP8)
    return q.reshape(x.shape), scale


def dequantize(q: jax.Array, scale: jax.Array, tile: tuple[int, ...]) -> jax.Array:
    """Inverse of `quantize`: every tile of q times its scale, in float32."""
    for axis, t in enumerate(tile):
        scale = jnp.repeat(scale, t, axis=axis)
    return q.astype(jnp.float32) * scale


PARTIAL_BYTES = 1 << 30  # float32 partial products of one step of `_scaled_dot`'s loop over contraction chunks


def _scaled_dot(a_gmk: jax.Array, b_gkn: jax.Array, b_cols: int) -> jax.Array:
    """float32 a @ b from E4M3 operands: a per 1xc tile, b per c x b_cols tile (c = _chunk(K)); one float32 dot per
    contraction chunk, scaled and summed in float32. The chunks run in a loop, as many per step as fit in
    PARTIAL_BYTES of (chunks, G, M, N) partials: all at once, a 671B dense layer's weight gradient held 32 x 7168 x
    18432 float32 partials (15.75 GiB)."""
    g, m, k = a_gmk.shape
    n = b_gkn.shape[2]
    c = _chunk(k)
    n_chunks = -(-k // c)
    per = max(1, min(n_chunks, PARTIAL_BYTES // (4 * g * m * n)))
    steps = -(-n_chunks // per)
    a = _pad(a_gmk, 2, c * per * steps)  # zero chunks add nothing (scale 1, values 0)
    b = _pad(_pad(b_gkn, 1, c * per * steps), 2, b_cols)
    qa, sa_gmc = quantize(a, (1, 1, c))
    qb, sb_gcb = quantize(b, (1, c, b_cols))
    qb = qb[:, :, :n]  # the edge column block is partial: scales came from the padded block, the dot skips padding
    sb_gcn = jnp.repeat(sb_gcb, b_cols, axis=2)[:, :, :n]
    # (steps, ...) leading: step s takes chunks s*per .. s*per + per - 1
    qa_s = qa.reshape(g, m, steps, per, c).transpose(2, 0, 1, 3, 4)
    qb_s = qb.reshape(g, steps, per, c, n).swapaxes(0, 1)
    sa_s = sa_gmc.reshape(g, m, steps, per).transpose(2, 0, 1, 3)
    sb_s = sb_gcn.reshape(g, steps, per, n).swapaxes(0, 1)

    def step(acc_gmn, xs):
        qa_gmpc, qb_gpcn, sa_gmp, sb_gpn = xs
        y_gpmn = jax.lax.dot_general(qa_gmpc, qb_gpcn, (((3,), (2,)), ((0, 2), (0, 1))),
                                     preferred_element_type=jnp.float32)
        return acc_gmn + jnp.einsum("gpmn,gmp,gpn->gmn", y_gpmn, sa_gmp, sb_gpn), None

    acc = like(jnp.zeros((g, m, n), jnp.float32), qa, qb)
    if steps == 1:
        return step(acc, (qa_s[0], qb_s[0], sa_s[0], sb_s[0]))[0]
    return jax.lax.scan(step, acc, (qa_s, qb_s, sa_s, sb_s))[0]


@jax.custom_vjp
def fp8_matmul(x_gmk: jax.Array, w_gkn: jax.Array) -> jax.Array:
    """Batched x @ w (float32 out) with the three GEMMs in FP8: forward and activation gradient with 1x128 tiles on
    the left operand and 128x128 blocks on the weight, weight gradient with 128x1 tiles along the tokens."""
    return _scaled_dot(x_gmk, w_gkn, FP8_BLOCK)


def _fp8_matmul_fwd(x_gmk, w_gkn):
    return _scaled_dot(x_gmk, w_gkn, FP8_BLOCK), (x_gmk, w_gkn)


def _fp8_matmul_bwd(res, dy_gmn):
    x_gmk, w_gkn = res
    dx_gmk = _scaled_dot(dy_gmn, jnp.swapaxes(w_gkn, 1, 2), FP8_BLOCK)  # dgrad: contraction over N
    dw_gkn = _scaled_dot(jnp.swapaxes(x_gmk, 1, 2), dy_gmn, 1)  # wgrad: contraction over the M tokens
    return dx_gmk.astype(x_gmk.dtype), dw_gkn.astype(w_gkn.dtype)


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` (float32 out) as one batched FP8 matmul: the letters shared by x, w and the output
    are the batch G, the other x letters the rows M, the summed letters the contraction K, the other w letters the
    columns N (so a [in, heads, head_dim] weight is blocked over [in, heads*head_dim], the released layout)."""
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    batch = [c for c in xs if c in ws and c in out]
    contract = [c for c in xs if c in ws and c not in out]
    rows = [c for c in xs if c not in ws]
    cols = [c for c in ws if c not in xs]
    if sorted(out) != sorted(batch + rows + cols):
        raise ValueError(f"fp8_einsum: {spec!r} is not a batched matmul")
    size = dict(zip(xs, x.shape, strict=True)) | dict(zip(ws, w.shape, strict=True))

    def prod(letters):
        return math.prod(size[c] for c in letters)

    x_gmk = jnp.transpose(x, [xs.index(c) for c in batch + rows + contract]).reshape(
        prod(batch), prod(rows), prod(contract))
    w_gkn = jnp.transpose(w, [ws.index(c) for c in batch + contract + cols]).reshape(
        prod(batch), prod(contract), prod(cols))
    y = fp8_matmul(x_gmk, w_gkn).reshape([size[c] for c in batch + rows + cols])
    return jnp.transpose(y, [(batch + rows + cols).index(c) for c in out])


def _row_groups(group_sizes_e: jax.Array, rows: int) -> jax.Array:
    """The group of every sorted row (rows past the last group are given the last group; ragged_dot zeroes them)."""
    return jnp.minimum(group_of_rows(group_sizes_e, rows), group_sizes_e.shape[0] - 1)


def _scaled_ragged_dot(a_rk: jax.Array, b_ekn: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    """float32 grouped a @ b[group] from E4M3 operands: a per 1xc tile, each group's b per c x 128 block; one
    float32 ragged dot per contraction chunk, scaled and summed in float32."""
    r, k = a_rk.shape
    n = b_ekn.shape[2]
    c = _chunk(k)
    a = _pad(a_rk, 1, c)
    b = _pad(_pad(b_ekn, 1, c), 2, FP8_BLOCK)
    qa, sa_rc = quantize(a, (1, c))
    qb, sb_ecb = quantize(b, (1, c, FP8_BLOCK))
    sb_rcn = jnp.repeat(sb_ecb[_row_groups(group_sizes_e, r)], FP8_BLOCK, axis=2)[:, :, :n]
    y_rn = jnp.zeros((r, n), jnp.float32)
    for i in range(a.shape[1] // c):
        part = jax.lax.ragged_dot(qa[:, i * c:(i + 1) * c], qb[:, i * c:(i + 1) * c, :n], group_sizes_e,
                                  preferred_element_type=jnp.float32)
        y_rn = y_rn + part * sa_rc[:, i:i + 1] * sb_rcn[:, i]
    return y_rn


def _scaled_ragged_wgrad(x_rk: jax.Array, dy_rn: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    """Per-group x^T dy (E, K, N) from E4M3 operands, both tiled 128x1 along the sorted rows; one float32 dot per
    row tile (a tile may span two groups: its rows are split between them by the ragged contraction)."""
    r, k = x_rk.shape
    n = dy_rn.shape[1]
    c = _chunk(r)
    x = _pad(x_rk, 0, c)
    dy = _pad(dy_rn, 0, c)
    n_tiles = x.shape[0] // c
    qx, sx_tk = quantize(x, (c, 1))
    qdy, sdy_tn = quantize(dy, (c, 1))
    end_e = jnp.cumsum(group_sizes_e)
    start_e = end_e - group_sizes_e
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])

    def tile(acc_ekn, t):
        lo = t * c
        sizes_e = jnp.clip(end_e, lo, lo + c) - jnp.clip(start_e, lo, lo + c)
        part = jax.lax.ragged_dot_general(jax.lax.dynamic_slice_in_dim(qx, lo, c),
                                          jax.lax.dynamic_slice_in_dim(qdy, lo, c), sizes_e, dims,
                                          preferred_element_type=jnp.float32)
        return acc_ekn + part * sx_tk[t][None, :, None] * sdy_tn[t][None, None, :], None

    acc = like(jnp.zeros((group_sizes_e.shape[0], k, n), jnp.float32), qx, qdy)
    return jax.lax.scan(tile, acc, jnp.arange(n_tiles))[0]


@jax.custom_vjp
def fp8_ragged_dot(x_rk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    """`lax.ragged_dot` (float32 out) with its three GEMMs in FP8, tiled as `fp8_matmul` (weights per expert)."""
    return _scaled_ragged_dot(x_rk, w_ekn, group_sizes_e)


def _fp8_ragged_fwd(x_rk, w_ekn, group_sizes_e):
    return _scaled_ragged_dot(x_rk, w_ekn, group_sizes_e), (x_rk, w_ekn, group_sizes_e)


def _fp8_ragged_bwd(res, dy_rn):
    x_rk, w_ekn, group_sizes_e = res
    dx_rk = _scaled_ragged_dot(dy_rn, jnp.swapaxes(w_ekn, 1, 2), group_sizes_e)
    dw_ekn = _scaled_ragged_wgrad(x_rk, dy_rn, group_sizes_e)
    return dx_rk.astype(x_rk.dtype), dw_ekn.astype(w_ekn.dtype), None


fp8_ragged_dot.defvjp(_fp8_ragged_fwd, _fp8_ragged_bwd)


# FP8 rows on the wire (the expert-parallel dispatch under precision "fp8", as DeepSeek-V3 dispatches): each row
# quantised per 1x128 tile along D, as the expert GEMM's left operand will be, and sent as bytes: the E4M3 values
# then the float32 scales, (R, Dp + 4 Dp / c) uint8 for Dp = D padded to the tile width c. The expert GEMM
# quantises the unpacked rows again and gets the same E4M3 values back (each tile's amax is its old amax).


def pack_rows(x_rd: jax.Array) -> jax.Array:
    """(R, D) -> (R, W) uint8: E4M3 values and float32 scales of 1x128 tiles."""
    c = _chunk(x_rd.shape[1])
    q, scale = quantize(_pad(x_rd, 1, c), (1, c))
    as_bytes = jax.lax.bitcast_convert_type
    return jnp.concatenate([as_bytes(q, jnp.uint8), as_bytes(scale, jnp.uint8).reshape(x_rd.shape[0], -1)], 1)


def packed_width(d: int) -> int:
    """Bytes per row of `pack_rows` for rows of width d."""
    c = _chunk(d)
    dp = round_up(d, c)
    return dp + 4 * dp // c


def unpack_rows(p_rw: jax.Array, d: int) -> jax.Array:
    """Inverse of `pack_rows`: (R, W) uint8 -> (R, d) float32."""
    c = _chunk(d)
    dp = round_up(d, c)
    q = jax.lax.bitcast_convert_type(p_rw[:, :dp], FP8)
    scale = jax.lax.bitcast_convert_type(p_rw[:, dp:].reshape(p_rw.shape[0], dp // c, 4), jnp.float32)
    return dequantize(q, scale, (1, c))[:, :d]
