"""Inside `jax.shard_map` every value is typed by the manual axes it varies over (a per-device value) or not (the
same on every device). A loop carry that starts as a constant and is updated from per-device inputs must be typed
varying from the start, or `lax.cond` / `fori_loop` / `scan` reject it: `like` does that for the kernels' loops,
`varying` for the train step's sums. Outside shard_map nothing varies and these return their input.
"""

from __future__ import annotations

import jax


def varying_axes(aval) -> tuple[str, ...]:
    """The manual axes a value (or its ShapeDtypeStruct / aval) varies over; () outside shard_map."""
    kind = getattr(aval, "manual_axis_type", None)
    return tuple(sorted(kind.varying)) if kind is not None else ()


def varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """`x` typed as varying over every axis of `axes` (a per-device copy: its gradient is this device's part)."""
    extra = tuple(a for a in axes if a not in varying_axes(jax.typeof(x)))
    return jax.lax.pcast(x, extra, to="varying") if extra else x


def like(tree, *refs):
    """Every array of `tree` typed as varying over the axes any of `refs` varies over."""
    axes = tuple(sorted({a for r in jax.tree.leaves(refs) for a in varying_axes(jax.typeof(r))}))
    return jax.tree.map(lambda x: varying(x, axes), tree)


def sum_over_devices(x: jax.Array) -> jax.Array:
    """A per-device partial sum (varying) -> the global sum (invariant); an invariant value is returned as is."""
    axes = varying_axes(jax.typeof(x))
    return jax.lax.psum(x, axes) if axes else x
