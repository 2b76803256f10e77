"""Building blocks: parameters with logical axes, RMSNorm, Linear, Embed, SwiGLU MLP, rotary embedding with YaRN.

Weights are stored [in, out] (JAX convention); hf.py transposes to and from torch's [out, in].
Rotary dims use the half-split ("rotate half") layout; hf.py permutes the released interleaved rows into it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import precision
from dsv3_jax.config import ModelConfig, yarn_mscale
from dsv3_jax.sharding import constrain


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float | None, dtype) -> nnx.Param:
    """A parameter with logical axes; std=None means ones (norm scales)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    """x / rms(x) * w, normalised in float32."""

    def __init__(self, dim: int, eps: float, policy: precision.Policy, rngs: nnx.Rngs):
        self.weight = param(rngs, (dim,), ("norm",), None, jnp.dtype(policy.param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


class Linear(nnx.Module):
    """y = einsum(spec, x, W) through the precision policy; W has `shape` and logical `axes`."""

    def __init__(self, spec: str, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
                 policy: precision.Policy, rngs: nnx.Rngs, std: float | None = None):
        self.spec = spec
        self.weight = param(rngs, shape, axes, cfg.initializer_range if std is None else std,
                            jnp.dtype(policy.param_dtype))
        self.policy = policy

    def __call__(self, x: jax.Array) -> jax.Array:
        return precision.einsum(self.spec, x, self.weight[...], self.policy)


class Embed(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(self, cfg: ModelConfig, policy: precision.Policy, rngs: nnx.Rngs):
        self.weight = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.initializer_range,
                            jnp.dtype(policy.param_dtype))
        self.dtype = policy.out_dtype

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        # gather the table's D shards first (FSDP): a lookup into a D-sharded table would fetch every token's ids
        table = constrain(self.weight[...], ("vocab", None))
        return jnp.take(table, ids_bt, axis=0).astype(self.dtype)  # (B, T, D)


class MLP(nnx.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)); used for dense layers and shared experts."""

    def __init__(self, cfg: ModelConfig, hidden: int, policy: precision.Policy, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.gate = Linear("btd,df->btf", (d, hidden), ("embed", "mlp"), cfg, policy, rngs)
        self.up = Linear("btd,df->btf", (d, hidden), ("embed", "mlp"), cfg, policy, rngs)
        self.down = Linear("btf,fd->btd", (hidden, d), ("mlp", "embed"), cfg, policy, rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x_btd)) * self.up(x_btd))


# ----------------------------------------------------------------------------------------------------------------
# Rotary embedding (YaRN).


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
