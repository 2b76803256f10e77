"""The precision policy and the ONE einsum (plus its grouped form) every linear layer calls.

A policy (built from the `impl` config section by `policy`, nowhere else) fixes the operands of the matmuls.
Float32 runs at HIGHEST precision so that parity with the reference holds on accelerators that would otherwise use
TF32; "bf16" takes bfloat16 operands with float32 accumulation; "fp8" routes to kernels/fp8.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv3_jax.kernels.fp8 import fp8_einsum, fp8_ragged_dot


@dataclasses.dataclass(frozen=True)
class Policy:
    """How linear layers compute. `precision` fixes the matmul operands (fp32 at HIGHEST precision; bf16 with
    float32 accumulation); `dtype` is the activation dtype results come back in; `param_dtype` the stored weights."""

    precision: str = "fp32"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def high(self) -> Policy:
        """The policy of a linear layer that FP8 training excludes (the output head): bf16 operands under fp8,
        the run's own policy otherwise."""
        return dataclasses.replace(self, precision="bf16") if self.precision == "fp8" else self

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
    if policy.precision == "fp8":
        return fp8_einsum(spec, x, w).astype(policy.out_dtype)
    dt = policy.compute_dtype
    y = jnp.einsum(spec, x.astype(dt), w.astype(dt), precision=policy.lax_precision,
                   preferred_element_type=jnp.float32)
    return y.astype(policy.out_dtype)


def ragged_dot(x_rd: jax.Array, w_edf: jax.Array, group_sizes_e: jax.Array, policy: Policy) -> jax.Array:
    """Grouped matmul of rows sorted by group under the policy (the MoE's other linear entry point)."""
    if policy.precision == "fp8":
        return fp8_ragged_dot(x_rd, w_edf, group_sizes_e).astype(policy.out_dtype)
    dt = policy.compute_dtype
    y = jax.lax.ragged_dot(x_rd.astype(dt), w_edf.astype(dt), group_sizes_e, precision=policy.lax_precision,
                           preferred_element_type=jnp.float32)
    return y.astype(policy.out_dtype)
