"""FP8 checkpoint blocks: E4M3 weights with one float32 `weight_scale_inv` per 128x128 block, edge blocks cropped.

NumPy only: these read and write the released checkpoint format, not the FP8 training GEMMs (kernels/fp8.py).
"""

from __future__ import annotations

import numpy as np

from dsv3_jax.errors import HFError
from dsv3_jax.kernels.fp8 import F32_TINY, FP8_BLOCK, FP8_MAX
from dsv3_jax.kernels.shapes import cdiv


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """Real weight of an FP8 [out, in] matrix: each block x block tile times its scale (edge tiles cropped)."""
    out_dim, in_dim = q.shape
    nb_out, nb_in = cdiv(out_dim, block), cdiv(in_dim, block)
    if scale_inv.shape != (nb_out, nb_in):
        raise HFError(f"weight_scale_inv has shape {scale_inv.shape}, expected {(nb_out, nb_in)} for weight "
                         f"{q.shape} with {block}x{block} blocks")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:out_dim, :in_dim]
    return q.astype(np.float32) * scale


def quantize_blocks(w: np.ndarray, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 weight and per-block `weight_scale_inv` (amax / 448) of an [out, in] float matrix."""
    import ml_dtypes  # noqa: PLC0415

    out_dim, in_dim = w.shape
    nb_out, nb_in = cdiv(out_dim, block), cdiv(in_dim, block)
    padded = np.zeros((nb_out * block, nb_in * block), np.float32)
    padded[:out_dim, :in_dim] = w
    tiles = padded.reshape(nb_out, block, nb_in, block)
    amax = np.abs(tiles).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, np.maximum(amax / FP8_MAX, F32_TINY), 1.0).astype(np.float32)
    q = np.clip(tiles / scale_inv[:, None, :, None], -FP8_MAX, FP8_MAX).reshape(padded.shape)[:out_dim, :in_dim]
    return q.astype(ml_dtypes.float8_e4m3fn), scale_inv
