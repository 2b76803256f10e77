"""The precision policy and the ONE einsum (plus its grouped form) every linear layer calls; FP8 block
(de)quantisation lives here.

A policy (built from the `impl` config section by `policy`, nowhere else) fixes the operands of the matmuls.
Float32 runs at HIGHEST precision so that parity with the reference holds on accelerators that would otherwise use
TF32. FP8 checkpoints use E4M3 with one float32
scale per 128x128 weight block (`weight_scale_inv`), edge blocks cropped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class Policy:
    """How linear layers compute. `precision` fixes the matmul operands (fp32 at HIGHEST precision; bf16 with
    float32 accumulation); `dtype` is the activation dtype results come back in; `param_dtype` the stored weights."""

    precision: str = "fp32"
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def compute_dtype(self):
        return jnp.dtype(jnp.float32 if self.precision == "fp32" else jnp.bfloat16)

    @property
    def out_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def lax_precision(self):
        return jax.lax.Precision.HIGHEST if self.compute_dtype == jnp.float32 else None


def policy(impl) -> Policy:
    """The one factory: `impl` (config.ImplConfig) -> the policy every linear layer and the MoE receive."""
    return Policy(precision=impl.precision, dtype=impl.dtype, param_dtype=impl.param_dtype)


def einsum(spec: str, x: jax.Array, w: jax.Array, policy: Policy) -> jax.Array:
    """`jnp.einsum(spec, x, w)` under the policy; every linear layer in the model goes through here."""
    dt = policy.compute_dtype
    y = jnp.einsum(spec, x.astype(dt), w.astype(dt), precision=policy.lax_precision,
                   preferred_element_type=jnp.float32)
    return y.astype(policy.out_dtype)


def ragged_dot(x_rd: jax.Array, w_edf: jax.Array, group_sizes_e: jax.Array, policy: Policy) -> jax.Array:
    """Grouped matmul of rows sorted by group under the policy (the MoE's other linear entry point)."""
    dt = policy.compute_dtype
    y = jax.lax.ragged_dot(x_rd.astype(dt), w_edf.astype(dt), group_sizes_e, precision=policy.lax_precision,
                           preferred_element_type=jnp.float32)
    return y.astype(policy.out_dtype)


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """Real weight of an FP8 [out, in] matrix: each block x block tile times its scale (edge tiles cropped)."""
    out_dim, in_dim = q.shape
    nb_out, nb_in = -(-out_dim // block), -(-in_dim // block)
    if scale_inv.shape != (nb_out, nb_in):
        raise ValueError(f"weight_scale_inv has shape {scale_inv.shape}, expected {(nb_out, nb_in)} for weight "
                         f"{q.shape} with {block}x{block} blocks")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:out_dim, :in_dim]
    return q.astype(np.float32) * scale


def quantize_blocks(w: np.ndarray, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 weight and per-block `weight_scale_inv` (amax / 448) of an [out, in] float matrix."""
    import ml_dtypes  # noqa: PLC0415

    out_dim, in_dim = w.shape
    nb_out, nb_in = -(-out_dim // block), -(-in_dim // block)
    padded = np.zeros((nb_out * block, nb_in * block), np.float32)
    padded[:out_dim, :in_dim] = w
    tiles = padded.reshape(nb_out, block, nb_in, block)
    amax = np.abs(tiles).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = (tiles / scale_inv[:, None, :, None]).reshape(padded.shape)[:out_dim, :in_dim]
    return q.astype(ml_dtypes.float8_e4m3fn), scale_inv
