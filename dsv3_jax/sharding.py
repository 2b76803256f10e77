"""Logical-axis sharding: the one rules table that maps logical names to mesh axes, and mesh creation.

Logical axes used by parameters:
  vocab       vocabulary rows of the embedding / columns of the head
  embed       the model width D
  q_lora      rank of the query compression (q_lora_rank)
  kv_lora     rank of the key/value compression plus the shared rotary key (kv_lora_rank + qk_rope_head_dim)
  heads       attention heads H
  head_dim    per-head width (nope+rope for queries, nope+v for keys/values, v for the output)
  mlp         hidden width of dense / shared-expert SwiGLU FFNs
  experts     routed experts E
  expert_mlp  hidden width of one routed expert
  layers      the stacked-layer axis that the layer scan runs over (prepended automatically)
  norm        RMSNorm scales (never sharded)
Logical axes used by activations:
  batch, seq, act_embed, act_heads, act_mlp, act_vocab
Mesh axes: data (pure data parallel), fsdp (data parallel with sharded parameters), expert (expert parallel;
also carries batch outside the MoE layers), tensor (tensor parallel over heads / FFN width / vocab).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dsv3_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical name -> mesh axis (or tuple of axes, or None for replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "vocab": "tensor",
    "embed": "fsdp",
    "q_lora": None,
    "kv_lora": None,
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "layers": None,
    "norm": None,
}


def logical_spec(axes: tuple[str | None, ...], rules: dict = RULES) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names (None stays replicated)."""
    return PartitionSpec(*(rules[a] if a is not None else None for a in axes))


def param_axes(variable) -> tuple[str | None, ...]:
    """Logical axes of a parameter, with `layers` prepended for stacked (scanned) parameters."""
    axes = tuple(variable.get_metadata().get("axes", ()))
    extra = len(variable.get_value().shape) - len(axes)
    return ("layers",) * extra + axes


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicate the dims whose size the mapped mesh axes do not divide (e.g. 3 heads on tensor=2)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        out.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return PartitionSpec(*out)


def state_shardings(state, mesh: Mesh, rules: dict = RULES):
    """NamedShardings for every variable of an nnx State (abstract or concrete), from its logical axes."""
    import flax.nnx as nnx  # noqa: PLC0415

    def one(v):
        if isinstance(v, nnx.Variable):
            spec = fit_spec(logical_spec(param_axes(v), rules), v.get_value().shape, mesh)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (single device, tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(logical_spec(axes), x.shape, mesh))


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over all devices; one axis may be -1 (takes the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/expert/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed axes product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                          f"have {len(devices)}")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
