"""Building blocks: parameters with logical axes, RMSNorm, Linear, Embed and the SwiGLU MLP.

Weights are stored [in, out] (JAX convention); interop/hf.py transposes to and from torch's [out, in].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.kernels import precision
from dsv3_jax.parallel.data_parallel import GATHER, gather
from dsv3_jax.parallel.embedding import lookup_d_sharded
from dsv3_jax.parallel.sharding import constrain


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
        axes = self.weight.get_metadata().get(GATHER)  # tagged on shards inside the train step's data-parallel region
        if axes:
            table = gather(self.weight.get_value(), (axes[0], ()))  # whole over V (the D shards stay)
            if axes[1]:  # the table never whole: ids gathered, rows looked up in my D columns, sent back
                return lookup_d_sharded(table, ids_bt, axes[1], self.dtype)
            return jnp.take(table, ids_bt, axis=0).astype(self.dtype)
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
