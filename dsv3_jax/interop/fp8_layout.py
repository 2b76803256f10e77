"""Where the released FP8 checkpoint's block scales land in our layout: which tensors it quantises, along which of
our axes a leaf's scale stays per 128x128 block (`kernels.fp8_weights`), and how the scale is sharded beside the
E4M3 values. The sliced loader (hf_sliced.py) and the decode planner (tools/plan_decode.py) both read this.
"""

from __future__ import annotations

import math
import re

import numpy as np

from dsv3_jax.interop.hf_format import entries, transpose
from dsv3_jax.kernels.fp8 import FP8_BLOCK
from dsv3_jax.kernels.fp8_weights import blocked_axes
from dsv3_jax.kernels.shapes import cdiv

# what the released FP8 checkpoint quantises (not eh_proj, the embedding or the head)
FP8_QUANTISED = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|"
                           r"down_proj)\.weight$")


def block_ids(shape: tuple[int, int], to_ours) -> np.ndarray:
    """Our layout of an [out, in] matrix's 128x128 block ids (which checkpoint scale each element takes)."""
    nb_in = cdiv(shape[1], FP8_BLOCK)
    rows = (np.arange(shape[0], dtype=np.int32) // FP8_BLOCK)[:, None]
    return to_ours(rows * nb_in + np.arange(shape[1], dtype=np.int32)[None] // FP8_BLOCK)


def blocking(hf_shape: tuple[int, ...], to_ours, trailing_rank: int) -> tuple[int, ...]:
    """The blocked axes (negative) of the scale of an [out, in] tensor mapped to our layout by `to_ours`: both
    for a transpose, else those along which the block id is constant on aligned runs of 128."""
    if to_ours is transpose and trailing_rank == 2:
        return (-2, -1)
    return blocked_axes(block_ids(hf_shape, to_ours), 0)


def block_suffix(path: tuple) -> tuple:
    """A leaf's path inside its block: ("moe_layers", 3, "mlp", "w_gate") and ("mtp", 0, "block", "mlp",
    "w_gate") -> ("mlp", "w_gate"); stacked paths have no layer index."""
    if path[0] == "mtp":
        return tuple(path[3:])
    return tuple(p for p in path[1:] if not isinstance(p, int))


def blockings(cfg) -> dict[tuple, tuple[int, ...]]:
    """{leaf path inside a block: blocked axes} for every tensor the released FP8 checkpoint quantises."""
    out = {}
    for entry in entries(cfg)[0]:
        target = entry.targets[0]
        suffix = block_suffix(target.path)
        if FP8_QUANTISED.search(entry.key) and suffix not in out:
            out[suffix] = blocking(entry.shape, target.to_ours, len(entry.shape))
    return out


def scale_spec(spec, shape: tuple[int, ...], blocked: tuple[int, ...], mesh):
    """The scale's PartitionSpec beside values sharded by `spec`: the same split wherever each shard starts on a
    block boundary, else replicated along that axis (GSPMD slices it where the values need it)."""
    from jax.sharding import PartitionSpec

    from dsv3_jax.kernels.fp8_weights import scale_shape
    from dsv3_jax.parallel.sharding import dims_axes, fit_spec

    out = []
    for ax, axes in enumerate(dims_axes(PartitionSpec(*spec, *(None,) * (len(shape) - len(spec))))):
        size = math.prod(mesh.shape[a] for a in axes)
        aligned = (ax - len(shape)) not in blocked or shape[ax] % (FP8_BLOCK * size) == 0
        out.append((axes[0] if len(axes) == 1 else axes) if axes and aligned else None)
    return fit_spec(PartitionSpec(*out), scale_shape(shape, blocked), mesh)
