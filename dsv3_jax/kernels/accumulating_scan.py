"""A layer scan whose weight gradients are added, one layer at a time, into a gradient accumulator.

Summing micro-batch gradients as `acc + grad(micro_batch)` holds two (L, ...) float32 buffers per stacked weight
through the backward pass: the accumulator, and the micro-batch's gradient that the backward scan writes one layer
slice at a time (at 671B on 256 devices: 12.7 GiB of each). Here the backward scan carries the accumulator itself
and adds each layer's weight gradient into its slice, in place, so the cotangent that comes out for the stacked
weights is already `acc + grad`: one buffer, as Megatron's fused weight-gradient accumulation into `main_grad`.

The forward saves each layer's input and the backward recomputes the layer from it, exactly what `jax.checkpoint`
around the layer body (`impl.remat: full`) does; the values and gradients are those of `lax.scan`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def accumulating_scan(body: Callable, x, weights, acc, consts, xs):
    """`lax.scan(lambda x, s: body(x, s[0], consts, s[1]), x, (weights, xs))` -> (x, ys), whose cotangent for
    `weights` (stacked on a leading layer axis) is `acc` plus the true gradient; `acc` is typed like `weights`.
    `consts` and `xs` take no gradient (masks, rotary tables, router biases)."""
    def step(x, layer):
        w, s = layer
        return body(x, w, consts, s)

    return jax.lax.scan(step, x, (weights, xs))


def _fwd(body, x, weights, acc, consts, xs):
    def step(x, layer):
        w, s = layer
        y, ys = body(x, w, consts, s)
        return y, (ys, x)

    out, (ys, inputs) = jax.lax.scan(step, x, (weights, xs))
    return (out, ys), (weights, acc, consts, xs, inputs)


def _bwd(body, res, ct):
    weights, acc, consts, xs, inputs = res
    ct_out, ct_ys = ct
    n = jax.tree.leaves(weights)[0].shape[0]
    ys_aval = jax.eval_shape(lambda: body(inputs[0], jax.tree.map(lambda w: w[0], weights), consts,
                                          jax.tree.map(lambda s: s[0], xs))[1])
    # integer outputs (expert counts) take float0 cotangents: rebuilt per layer, not scanned over
    float_ct = [c for c, a in zip(jax.tree.leaves(ct_ys), jax.tree.leaves(ys_aval)) if _is_float(a)]

    def step(carry, layer):
        dx, acc = carry
        i, x_in, cts = layer
        w = jax.tree.map(lambda a: a[i], weights)
        s = jax.tree.map(lambda a: a[i], xs)
        _, vjp = jax.vjp(lambda x, w: body(x, w, consts, s), x_in, w)
        it = iter(cts)
        ct_layer = jax.tree.unflatten(jax.tree.structure(ys_aval), [
            next(it) if _is_float(a) else np.zeros(a.shape, jax.dtypes.float0) for a in jax.tree.leaves(ys_aval)])
        dx, dw = vjp((dx, ct_layer))
        acc = jax.tree.map(lambda a, g: jax.lax.dynamic_update_index_in_dim(a, a[i] + g.astype(a.dtype), i, 0),
                           acc, dw)
        return (dx, acc), None

    (dx, acc), _ = jax.lax.scan(step, (ct_out, acc), (jnp.arange(n), inputs, float_ct), reverse=True)
    return dx, acc, None, None, None


accumulating_scan.defvjp(_fwd, _bwd)
