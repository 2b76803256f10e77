"""FP8 weights kept in memory for inference: E4M3 values with their checkpoint block scales, dequantised where a
matmul reads them, so the resident and per-step weight bytes are ~1 per parameter.

An `Fp8Weight` is the value of an nnx parameter in our layout (q has the leaf's shape). Its scale has the same
rank: along the `blocked` axes it holds one value per 128 elements (the checkpoint's 128x128 blocks, mapped through
our layout: a transpose keeps both axes blocked), along the others one value per element (where a head split or a
row permutation breaks the blocks apart; those are attention projections, ~2% of a DeepSeek-V3's weights).
`w[...]` (how every layer reads its weight) returns `q * scale` in the compute dtype: XLA fuses the convert and
multiply into the consumer, so the matmul reads the FP8 bytes. `blocked` counts axes from the end, so that
indexing the leading layer / expert axes (`unstacked`) keeps it valid.

Legend: `...` leading axes, n the size of a blocked axis, nb = ceil(n / 128).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.kernels.fp8 import FP8_BLOCK
from dsv3_jax.kernels.shapes import cdiv

FP8_WEIGHT_DTYPE = jnp.float8_e4m3fn


def expand_scale(scale: jax.Array, shape: tuple[int, ...], blocked: tuple[int, ...], block: int = FP8_BLOCK):
    """The per-element scale of a weight of `shape`: each blocked axis repeated `block` times and cropped."""
    for ax in blocked:
        scale = jnp.repeat(scale, block, axis=ax)
        scale = jax.lax.slice_in_dim(scale, 0, shape[ax], axis=ax)
    return scale


@jax.tree_util.register_pytree_node_class
class Fp8Weight:
    """q (..., float8_e4m3fn) and scale (float32, blocked along `blocked`); `dtype` is what `w[...]` returns."""

    def __init__(self, q, scale, blocked: tuple[int, ...], dtype):
        self.q, self.scale, self.blocked, self.dtype = q, scale, tuple(blocked), jnp.dtype(dtype)

    def tree_flatten(self):
        return (self.q, self.scale), (self.blocked, self.dtype.name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError(f"Fp8Weight supports only w[...], got w[{index!r}]")
        return dequantize(self)

    def __repr__(self) -> str:
        return f"Fp8Weight(q={self.shape} {self.q.dtype}, scale={tuple(self.scale.shape)}, blocked={self.blocked})"


def dequantize(w: Fp8Weight) -> jax.Array:
    """q * scale in float32 (exactly the checkpoint's dequantisation), then cast to the weight's dtype."""
    scale = expand_scale(w.scale.astype(jnp.float32), w.shape, w.blocked)
    return (w.q.astype(jnp.float32) * scale).astype(w.dtype)


def blocked_axes(block_id: np.ndarray, lead: int, block: int = FP8_BLOCK) -> tuple[int, ...]:
    """The trailing axes (negative, past the `lead` index axes) along which `block_id` (our layout, one checkpoint
    block id per element) is constant on aligned runs of `block` elements: the axes a scale may keep per block."""
    out = []
    for ax in range(lead, block_id.ndim):
        n = block_id.shape[ax]
        starts = np.take(block_id, np.arange(0, n, block), axis=ax)
        if np.array_equal(np.repeat(starts, block, axis=ax).take(np.arange(n), axis=ax), block_id):
            out.append(ax - block_id.ndim)
    return tuple(out)


def compress_scale(scale_full: np.ndarray, blocked: tuple[int, ...], block: int = FP8_BLOCK) -> np.ndarray:
    """A per-element scale (our layout) kept once per `block` elements along the `blocked` axes."""
    for ax in blocked:
        scale_full = np.take(scale_full, np.arange(0, scale_full.shape[ax], block), axis=ax)
    return scale_full


def scale_shape(shape: tuple[int, ...], blocked: tuple[int, ...], block: int = FP8_BLOCK) -> tuple[int, ...]:
    """The shape of the scale of a weight of `shape`."""
    out = list(shape)
    for ax in blocked:
        out[ax] = cdiv(shape[ax], block)
    return tuple(out)
