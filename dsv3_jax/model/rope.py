"""Rotary embedding with YaRN: inverse frequencies (ramped between beta_fast and beta_slow), cos/sin, rotation.

Rotary dims use the half-split ("rotate half") layout; interop/hf.py permutes the released interleaved rows into it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, yarn_mscale


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rope_dim/2] and the cos/sin multiplier, with YaRN's ramp between
    interpolated and extrapolated frequencies when `rope_scaling` is set."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    y = cfg.rope_scaling
    if y is None:
        return extrapolated.astype(np.float32), 1.0
    interpolated = 1.0 / (y.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1.0 - ramp
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    if y.attention_factor is not None:
        attention_factor = y.attention_factor
    elif y.mscale and y.mscale_all_dim:
        attention_factor = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(y.factor)
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions_bt: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (B, T, rope_dim/2) in float32 for integer positions."""
    inv_freq, factor = rope_inv_freq(cfg)
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos_bt: jax.Array, sin_bt: jax.Array) -> jax.Array:
    """Rotate the half-split pairs (i, i + d/2) of x (B, T, [H,] d) by the position angles."""
    if x.ndim == 4:
        cos_bt, sin_bt = cos_bt[:, :, None, :], sin_bt[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_bt - x2 * sin_bt, x2 * cos_bt + x1 * sin_bt], axis=-1)
    return out.astype(x.dtype)
