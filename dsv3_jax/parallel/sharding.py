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
also carries batch outside the MoE layers), context (splits the sequence: `seq` maps to it when mesh.context > 1;
the mesh has this axis only then), tensor (tensor parallel over heads / FFN width / vocab).

Every large weight is sharded over the data-parallel axes that hold a parameter shard (fsdp and expert) as well as
its model axis: `embed` (and the low-rank `q_lora` / `kv_lora`) map to ("fsdp", "expert"), and a mesh axis that an
earlier dimension of the same weight already uses is dropped (routed experts are (expert, fsdp, tensor)), so
parameters take about 1/N of their bytes per device at any mesh shape. A dimension that a mesh axis does not
divide keeps the longest prefix of its axes that does.

`mesh.rules` in the config overrides entries of the table (a preset changes its strategy without a code edit);
`use_rules` makes a table current for `constrain`, `state_shardings` and the MoE layer, as `jax.set_mesh` does
for the mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dsv3_jax.config import MeshConfig
from dsv3_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")


# logical name -> mesh axis (or tuple of axes, or None for replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "vocab": "tensor",
    "embed": ("fsdp", "expert"),
    "q_lora": ("fsdp", "expert"),
    "kv_lora": ("fsdp", "expert"),
    "heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "layers": None,
    "norm": None,
}


_ACTIVE_RULES: contextvars.ContextVar[dict] = contextvars.ContextVar("dsv3_rules", default=RULES)


def current_rules() -> dict:
    """The rules table made current by `use_rules` (the default table otherwise)."""
    return _ACTIVE_RULES.get()


@contextlib.contextmanager
def use_rules(rules: dict):
    """Make `rules` the table that constrain / state_shardings / the MoE layer read, for the enclosed code."""
    token = _ACTIVE_RULES.set(rules)
    try:
        yield rules
    finally:
        _ACTIVE_RULES.reset(token)


def rules_for(cfg: MeshConfig) -> dict:
    """The default table with `mesh.rules` overrides applied; unknown logical or mesh axes are ConfigErrors. Under
    mesh.context > 1 the sequence is split over `context` unless `mesh.rules` says otherwise."""
    rules = dict(RULES, seq="context") if cfg.context > 1 else dict(RULES)
    for name, value in cfg.rules:
        if name not in RULES:
            raise ConfigError(f"mesh.rules: unknown logical axis {name!r}; known: {', '.join(RULES)}")
        axes = (value,) if isinstance(value, str) else tuple(value or ())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"mesh.rules.{name}: unknown mesh axis {bad[0]!r}; mesh axes: {', '.join(MESH_AXES)}")
        rules[name] = axes[0] if len(axes) == 1 else (axes or None)
    return rules


def mesh_axes(logical: str, rules: dict | None = None) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to, as a tuple (empty when replicated)."""
    value = (rules or current_rules())[logical]
    return (value,) if isinstance(value, str) else tuple(value or ())


def logical_spec(axes: tuple[str | None, ...], rules: dict | None = None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names (None stays replicated). A mesh axis already used by an
    earlier dimension is dropped from later ones (a spec may name each mesh axis once)."""
    rules = rules or current_rules()
    used: set[str] = set()
    out = []
    for a in axes:
        names = tuple(n for n in (mesh_axes(a, rules) if a is not None else ()) if n not in used)
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def param_axes(variable) -> tuple[str | None, ...]:
    """Logical axes of a parameter, with `layers` prepended for stacked (scanned) parameters."""
    axes = tuple(variable.get_metadata().get("axes", ()))
    extra = len(variable.get_value().shape) - len(axes)
    return ("layers",) * extra + axes


def dims_axes(spec: PartitionSpec) -> list[tuple[str, ...]]:
    """The mesh axes of each dimension of `spec`, as tuples (() for a replicated dimension)."""
    return [(a,) if isinstance(a, str) else tuple(a or ()) for a in spec]


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Keep, per dim, the longest prefix of its mesh axes whose product divides the size (3 heads on tensor=2 are
    replicated; 576 rows on fsdp=32 x expert=8 keep fsdp)."""
    out = []
    for dim, names in zip(shape, dims_axes(PartitionSpec(*spec, *(None,) * (len(shape) - len(spec))))):
        names = tuple(n for n in names if n in mesh.shape)  # `context` exists only when it splits
        while names and dim % math.prod(mesh.shape[a] for a in names):
            names = names[:-1]
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def state_specs(state, mesh, rules: dict | None = None):
    """PartitionSpecs for every variable of an nnx State (abstract or concrete), from its logical axes; `mesh` may
    be abstract (inside jit)."""
    import flax.nnx as nnx  # noqa: PLC0415

    def one(v):
        if isinstance(v, nnx.Variable):
            return v.replace(fit_spec(logical_spec(param_axes(v), rules), v.get_value().shape, mesh))
        return PartitionSpec()

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state, mesh: Mesh, rules: dict | None = None):
    """NamedShardings for every variable of an nnx State (abstract or concrete), from its logical axes."""
    import flax.nnx as nnx  # noqa: PLC0415

    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, v.get_value())) if isinstance(v, nnx.Variable)
                        else NamedSharding(mesh, v), state_specs(state, mesh, rules),
                        is_leaf=lambda x: isinstance(x, (nnx.Variable, PartitionSpec)))


def without_axes(spec: PartitionSpec, drop) -> PartitionSpec:
    """`spec` with the mesh axes in `drop` removed from every dimension."""
    out = []
    for axes in dims_axes(spec):
        names = tuple(n for n in axes if n not in drop)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def only_axes(spec: PartitionSpec, keep) -> PartitionSpec:
    """`spec` with only the mesh axes in `keep` left (the part a shard_map over `keep` names)."""
    return without_axes(spec, {n for axes in dims_axes(spec) for n in axes if n not in keep})


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (single device, tests). Inside a
    shard_map the axes it made manual are left out (the array is already this device's block along them)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = without_axes(logical_spec(axes), set(mesh.manual_axes))
    return jax.lax.with_sharding_constraint(x, fit_spec(spec, x.shape, mesh))


def mesh_size(mesh, axes: tuple[str, ...]) -> int:
    """How many devices the mesh axes `axes` span together (1 for none)."""
    return math.prod(mesh.shape[a] for a in axes)


def logical_size(mesh, logical: str, rules: dict | None = None) -> int:
    """How many ways a logical axis is split: e.g. `experts` (expert parallelism), `batch` (data parallelism)."""
    return mesh_size(mesh, mesh_axes(logical, rules))


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, expert, [context,] tensor) mesh over all devices; one axis may be -1 (takes the rest). The
    context axis is left out at size 1, so meshes without context parallelism are as before."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.context, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/expert/context/tensor may be -1")
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
    names = [a for a, s in zip(MESH_AXES, sizes) if a != "context" or s > 1]
    grid = np.asarray(devices).reshape([s for a, s in zip(MESH_AXES, sizes) if a in names])
    return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))
