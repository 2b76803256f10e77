"""Cross-entropy through the output head without the (N, V) logits: the vocabulary in chunks of C columns.

The forward keeps an online logsumexp per row (running max m, rescaled sum s) and the target's logit over the
chunks; the backward recomputes each chunk's logits from h and the saved logsumexp, so only one (N, C) block of
logits and one (D, C) block of the head are alive at a time. The head may come in as this device's rows of a
D-sharded weight (inside the train step's data-parallel region): each chunk's columns are all-gathered just in time
(in the matmul's operand dtype) and their gradient reduce-scattered back (in the weight's dtype).

The logits are those the head returns (`precision.einsum` under its policy: bf16 operands with float32 accumulation
under bf16/fp8, HIGHEST under fp32, cast to the activation dtype) taken to float32 as `losses.cross_entropy_sum`
does; the backward's matmuls take the same operands and round the gradients where autodiff of that path does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsv3_jax.kernels import precision
from dsv3_jax.kernels.varying import like, varying_axes


def chunked_cross_entropy(h_nd: jax.Array, w_dv: jax.Array, targets_n: jax.Array, mask_n: jax.Array, chunk: int,
                          policy: precision.Policy, gather_axes: tuple[str, ...] = ()) -> jax.Array:
    """sum_n mask_n * (logsumexp_v(h_n W) - (h_n W)[target_n]) in float32, the head's logits `h W` never whole.

    h_nd (N, D) after the final norm; w_dv (D/S, V): the head, or this device's rows of it when `gather_axes` (mesh
    axes, inside shard_map) shard its D dimension over S devices; targets_n int (N,); mask_n (N,) weights (0 = no
    target). A last chunk of V % chunk columns covers a vocabulary that `chunk` does not divide."""
    return chunked_token_losses(h_nd, w_dv, targets_n, mask_n, chunk, policy, gather_axes).sum()


def chunked_token_losses(h_nd: jax.Array, w_dv: jax.Array, targets_n: jax.Array, mask_n: jax.Array, chunk: int,
                         policy: precision.Policy, gather_axes: tuple[str, ...] = ()) -> jax.Array:
    """The terms of `chunked_cross_entropy`, (N,) float32: rows of several losses (main and MTP) in one pass over
    the vocabulary, each summed on its own."""
    if policy.precision == "fp8":
        raise ValueError("the head runs under policy.high(): bf16 or fp32 operands, not fp8")
    return _ce(chunk, policy, tuple(gather_axes), h_nd, w_dv, targets_n.astype(jnp.int32),
               mask_n.astype(jnp.float32))


def _spans(v: int, chunk: int) -> tuple[int, int]:
    """(full chunks, columns of the last partial chunk)."""
    return v // chunk, v % chunk


def _columns(w_dv, start, size: int, axes, policy):
    """Columns start..start+size of the head in the matmul's operand dtype (the cast the einsum makes anyway, before
    the gather: half the bytes under bf16), all-gathered over `axes` along D: (D, size)."""
    w_dc = jax.lax.dynamic_slice_in_dim(w_dv, start, size, axis=1).astype(policy.compute_dtype)
    return jax.lax.all_gather(w_dc, axes, axis=0, tiled=True) if axes else w_dc


def _logits(h_nd, w_dc, policy):
    """(N, C) float32: the head's logits on these columns as the loss sees them."""
    return precision.einsum("nd,dc->nc", h_nd, w_dc, policy).astype(jnp.float32)


def _target_logit(z_nc, targets_n, start, size: int):
    """z[n, target_n - start] where the target falls in this chunk, else 0."""
    local = targets_n - start
    hit = (local >= 0) & (local < size)
    picked = jnp.take_along_axis(z_nc, jnp.clip(local, 0, size - 1)[:, None], axis=1)[:, 0]
    return jnp.where(hit, picked, 0.0)


def _forward(chunk, policy, axes, h_nd, w_dv, targets_n):
    """(logsumexp (N,), target logit (N,)) by an online logsumexp over the chunks."""
    n_full, tail = _spans(w_dv.shape[1], chunk)

    def step(carry, start, size):
        m, s, t = carry
        z = _logits(h_nd, _columns(w_dv, start, size, axes, policy), policy)
        m_new = jnp.maximum(m, z.max(axis=1))
        s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(axis=1)  # rescale the old sum to the new max
        return m_new, s, t + _target_logit(z, targets_n, start, size)

    rows = h_nd.shape[0]
    carry = like((jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
                  jnp.zeros((rows,), jnp.float32)), h_nd, w_dv)
    if n_full:
        carry = jax.lax.fori_loop(0, n_full, lambda i, c: step(c, i * chunk, chunk), carry)
    if tail:
        carry = step(carry, n_full * chunk, tail)
    m, s, t = carry
    return m + jnp.log(s), t


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ce(chunk, policy, axes, h_nd, w_dv, targets_n, mask_n):
    lse, t = _forward(chunk, policy, axes, h_nd, w_dv, targets_n)
    return (lse - t) * mask_n


def _ce_fwd(chunk, policy, axes, h_nd, w_dv, targets_n, mask_n):
    lse, t = _forward(chunk, policy, axes, h_nd, w_dv, targets_n)
    return (lse - t) * mask_n, (h_nd, w_dv, targets_n, mask_n, lse)


def _ce_bwd(chunk, policy, axes, res, g):
    """d/dz = g mask (softmax(z) - onehot(target)) per chunk, recomputed from lse; dh accumulated in float32 over
    the chunks, dW written chunk by chunk (reduce-scattered over `axes` when the head came in on D shards)."""
    h_nd, w_dv, targets_n, mask_n, lse = res
    n_full, tail = _spans(w_dv.shape[1], chunk)
    dt, prec = policy.compute_dtype, policy.lax_precision
    scale_n = g * mask_n  # g (N,): each row's loss weight

    def step(carry, start, size):
        dh, dw = carry
        w_dc = _columns(w_dv, start, size, axes, policy)
        z = _logits(h_nd, w_dc, policy)
        onehot = (targets_n - start)[:, None] == jnp.arange(size)[None, :]
        # the logits' cotangent in the dtype the head returned them in, as autodiff of the full path has it
        dz = (scale_n[:, None] * (jnp.exp(z - lse[:, None]) - onehot)).astype(policy.out_dtype).astype(dt)
        dh = dh + jnp.einsum("nc,dc->nd", dz, w_dc, precision=prec, preferred_element_type=jnp.float32)
        dw_dc = jnp.einsum("nd,nc->dc", h_nd.astype(dt), dz, precision=prec, preferred_element_type=jnp.float32)
        dw_dc = dw_dc.astype(dt).astype(w_dv.dtype)  # the cotangent of the weight's cast to the operand dtype
        # reduce-scattered in the weight's dtype, as the transpose of today's gather of the whole weight
        if axes:
            dw_dc = jax.lax.psum_scatter(dw_dc, axes, scatter_dimension=0, tiled=True)
        return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_dc, start, axis=1)

    carry = like((jnp.zeros(h_nd.shape, jnp.float32), jnp.zeros(w_dv.shape, w_dv.dtype)), h_nd, w_dv, g)
    if n_full:
        carry = jax.lax.fori_loop(0, n_full, lambda i, c: step(c, i * chunk, chunk), carry)
    if tail:
        carry = step(carry, n_full * chunk, tail)
    dh, dw = carry
    return _typed_as(dh.astype(h_nd.dtype), h_nd), _typed_as(dw, w_dv), None, None


def _typed_as(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the manual axes it varies over and its primal does not (the transpose of the
    implicit broadcast of an invariant primal), so that it types like the primal inside shard_map."""
    extra = tuple(a for a in varying_axes(jax.typeof(ct)) if a not in varying_axes(jax.typeof(primal)))
    return jax.lax.psum(ct, extra) if extra else ct


_ce.defvjp(_ce_fwd, _ce_bwd)
