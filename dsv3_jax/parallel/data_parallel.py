"""The train step's data-parallel region: the micro-batch loop inside one `jax.shard_map` over the batch axes, so
that gradients are accumulated on each device and reduced once per step, not once per micro-batch.

Entering the region, each parameter is gathered over the batch axes that shard it (ZeRO: once per step, and kept
for every micro-batch), except the routed-expert weights (`resident`), which keep their expert-axis shards: each
device holds its experts whole for the whole step and only tokens move to them (the MoE layer's exchange). The
gradients of this device's micro-batches are summed locally, as varying values; leaving the region, one
reduce-scatter per parameter puts each sum on the shard that owns it (psum over batch axes that replicate it, none
for a resident expert whose expert axes span the batch). The optimizer update then runs on the shards (GSPMD).

With `impl.gather_weights: layer` the other weights enter on their shards over `LAYER_AXES` (the innermost batch
axis, `expert`: consecutive devices, inside a node), gathered over the other batch axes once per step as above,
and tagged with the axes left to gather (`GATHER` metadata on their nnx Variables); `gather_params` gathers the
top-level ones as the model starts and each scanned layer's slice as its layer runs (again under remat), so one
layer's weights are whole at a time. The gathers' transposes reduce-scatter those gradients over `LAYER_AXES` in
every micro-batch; the reduction over the other batch axes still runs once per step. Sharding the weights over
both (`mesh.rules`, e.g. embed: [expert, fsdp]) keeps their master copy and optimizer state at 1/N per device
(ZeRO) while the per-layer traffic stays inside the node.

Specs here name mesh axes; `manual` is the region's axes (the batch axes). The tensor axis stays automatic.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from dsv3_jax.parallel.sharding import dims_axes, only_axes, param_axes

GATHER = "gather_axes"  # Variable metadata: the mesh axes to all-gather each dimension over, in the region
LAYER_AXES = ("expert",)  # the batch axes a weight keeps its shards over inside the region under gather "layer"


def resident(logical_axes: tuple[str | None, ...]) -> bool:
    """Routed-expert weights (the only parameters with an `expert_mlp` axis) stay on their expert shards."""
    return "expert_mlp" in logical_axes


def entry_spec(spec: PartitionSpec, logical_axes: tuple[str | None, ...], manual,
               per_layer: bool = False) -> PartitionSpec:
    """The spec a parameter enters the region with, over the manual axes: a resident expert weight keeps its
    `experts` dimension's axes (and is gathered along any other dimension the batch axes shard), the rest whole,
    or (`per_layer`) on their shards over `LAYER_AXES`, to be gathered over those as they are used."""
    spec = only_axes(spec, manual)
    if not resident(logical_axes):
        return only_axes(spec, LAYER_AXES) if per_layer else PartitionSpec(*(None for _ in spec))
    keep = {a for axes, name in zip(dims_axes(spec), logical_axes) if name == "experts" for a in axes}
    return only_axes(spec, keep)


def reduce_gradient(g: jax.Array, spec: PartitionSpec, entry: PartitionSpec, manual: tuple[str, ...]) -> jax.Array:
    """This device's gradient sum (varying over `manual`, in the `entry` layout) -> its shard of the global sum in
    the parameter's `spec`: psum over the manual axes that do not shard the parameter, reduce-scatter along each
    dimension the region gathered; nothing over the axes of a resident expert dimension."""
    full, kept = dims_axes(only_axes(spec, manual)), {a for axes in dims_axes(entry) for a in axes}
    sharding = {a for axes in full for a in axes}
    replicated = tuple(a for a in manual if a not in sharding)
    if replicated:
        g = jax.lax.psum(g, replicated)
    for dim, axes in enumerate(full):
        gathered = tuple(a for a in axes if a not in kept)
        if gathered:
            g = jax.lax.psum_scatter(g, gathered, scatter_dimension=dim, tiled=True)
    return g


def exit_spec(spec: PartitionSpec, manual) -> PartitionSpec:
    """The spec a parameter's reduced gradient leaves the region with: its own, over the manual axes."""
    return only_axes(spec, manual)


def gather(x: jax.Array, axes_per_dim) -> jax.Array:
    """All-gather each dimension of this device's block over its mesh axes (tiled: the whole array back)."""
    for dim, axes in enumerate(axes_per_dim):
        if axes:
            x = jax.lax.all_gather(x, tuple(axes), axis=dim, tiled=True)
    return x


def gather_params(state, stacked: bool = True):
    """`state` (nnx Variables) with every Variable tagged `GATHER` gathered whole and untagged; a scanned layer's
    slice drops the tag's leading (layer) dimensions. `stacked=False` leaves the stacked (L, ...) weights for the
    layer scan to gather one slice at a time."""
    def one(v):
        axes = v.get_metadata().get(GATHER)
        if not axes or (not stacked and param_axes(v)[0] == "layers"):
            return v
        value = v.get_value()
        out = v.replace(gather(value, axes[len(axes) - value.ndim:]))
        out.set_metadata(GATHER, None)
        return out

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
