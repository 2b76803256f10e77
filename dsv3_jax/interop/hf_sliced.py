"""Loading an HF checkpoint onto a mesh with each process reading only the slices its devices hold.

For every parameter, `jax.make_array_from_callback` asks for the block of each addressable device; the block is
built from the HF tensors that overlap it: a tensor whose layer/expert index lies outside the block is not read at
all, and a tensor that maps to ours by identity or a transpose (embedding, head, plain linears, every routed expert)
is read only in the rows and columns the block needs, straight from the file's bytes (FP8 weights with their
128x128 scale blocks sliced to match and the partial edge blocks cropped). The other tensors (attention projections
with head splits or rope row permutations, transformers' fused expert layout) are read in the bounding box of the
elements the block needs. Host memory is the process's share of one parameter plus, for those other tensors, a
buffer of one HF tensor.
"""

from __future__ import annotations

import math

import numpy as np

from dsv3_jax.errors import HFError
from dsv3_jax.interop.fp8_layout import blocking, scale_spec
from dsv3_jax.interop.hf_format import F8_DTYPE, SCALE_SUFFIX, listing, same, transpose
from dsv3_jax.kernels.fp8 import FP8_BLOCK
from dsv3_jax.kernels.fp8_weights import Fp8Weight, compress_scale, scale_shape
from dsv3_jax.kernels.shapes import cdiv

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _np_dtype(name: str):
    import ml_dtypes

    extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    return np.dtype(_DTYPES.get(name) or extra[name])


def read_slice(reader, key: str, ranges: tuple[tuple[int, int], ...], raw: bool = False) -> np.ndarray:
    """tensor[r0:r1, c0:c1, ...] read from the file's bytes (counted in reader.bytes_read); FP8 dequantised unless
    `raw` (then the E4M3 values as stored)."""
    file, info = reader.where[key], reader.info(key)
    shape = tuple(info["shape"])
    index = tuple(slice(a, b) for a, b in ranges)
    out_shape = tuple(b - a for a, b in ranges)
    if math.prod(shape) == 0 or math.prod(out_shape) == 0:
        return np.zeros(out_shape, np.float32 if info["dtype"] == F8_DTYPE else _np_dtype(info["dtype"]))
    try:
        mm = np.memmap(file, _np_dtype(info["dtype"]), mode="r", offset=reader.headers[file][1]
                       + info["data_offsets"][0], shape=shape)
        a = np.array(mm[index])
    except (OSError, ValueError, KeyError) as e:
        raise HFError(f"{file}: cannot read tensor {key} ({e})") from None
    reader.bytes_read += a.nbytes
    if info["dtype"] != F8_DTYPE or raw:
        return a
    if key + SCALE_SUFFIX not in reader.where or len(shape) != 2:
        raise HFError(f"{file}: FP8 tensor {key} has no {key + SCALE_SUFFIX}")
    (r0, r1), (c0, c1) = ranges
    nb = (cdiv(shape[0], FP8_BLOCK), cdiv(shape[1], FP8_BLOCK))
    if tuple(reader.info(key + SCALE_SUFFIX)["shape"]) != nb:
        raise HFError(f"{file}: {key}: weight_scale_inv has shape {reader.info(key + SCALE_SUFFIX)['shape']}, expected "
                      f"{list(nb)} for weight {list(shape)} with {FP8_BLOCK}x{FP8_BLOCK} blocks")
    b0, b1 = r0 // FP8_BLOCK, c0 // FP8_BLOCK
    s = read_slice(reader, key + SCALE_SUFFIX, ((b0, cdiv(r1, FP8_BLOCK)), (b1, cdiv(c1, FP8_BLOCK))))
    s = np.repeat(np.repeat(s.astype(np.float32), FP8_BLOCK, 0), FP8_BLOCK, 1)
    s = s[r0 - b0 * FP8_BLOCK:r1 - b0 * FP8_BLOCK, c0 - b1 * FP8_BLOCK:c1 - b1 * FP8_BLOCK]
    return a.astype(np.float32) * s


def _ranges(index: tuple, shape: tuple) -> tuple[tuple[int, int], ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _part(reader, entry, target, trailing, raw: bool = False) -> np.ndarray:
    """Our target[index][trailing] from the HF tensor of `entry`. Identity and transpose maps read exactly the
    slice; other maps (head splits, rope row orders, fused experts) find the bounding box of the HF elements the
    slice needs by pushing an index array through the same map, and read only that box. `raw`: FP8 as stored."""
    if target.to_ours is same:
        return read_slice(reader, entry.key, trailing, raw)
    if target.to_ours is transpose and len(trailing) == 2:
        return read_slice(reader, entry.key, trailing[::-1], raw).T
    crop = tuple(slice(a, b) for a, b in trailing)
    flat = target.to_ours(np.arange(math.prod(entry.shape), dtype=np.int64).reshape(entry.shape))[crop]
    buf_dtype = _np_dtype(F8_DTYPE) if raw else np.float32
    if flat.size == 0:
        return np.zeros(flat.shape, buf_dtype)
    box = tuple((int(c.min()), int(c.max()) + 1) for c in np.unravel_index(flat.ravel(), entry.shape))
    buf = np.zeros(entry.shape, buf_dtype)
    buf[tuple(slice(a, b) for a, b in box)] = read_slice(reader, entry.key, box, raw)
    return target.to_ours(buf)[crop]


def block(reader, path, shape, dtype, index, parts, shared, raw: bool = False) -> np.ndarray:
    """The block `index` of our leaf `path` (a device's share), from the HF tensors that overlap it (`raw`: the
    E4M3 values of FP8 tensors, in a float8_e4m3fn block)."""
    import sys

    ranges = _ranges(index, shape)
    out = np.empty(tuple(b - a for a, b in ranges), dtype)
    for entry, t in parts:
        lead = len(t.index)
        if not all(a <= i < b for i, (a, b) in zip(t.index, ranges)):
            continue  # this HF tensor lies outside the block: never read
        dst = tuple(i - a for i, (a, _) in zip(t.index, ranges))
        out[dst] = _part(reader, entry, t, ranges[lead:], raw)
    for entry in shared:
        if not np.array_equal(_part(reader, entry, entry.targets[0], ranges).astype(dtype), out):
            print(f"warning: {entry.key} differs from the shared {'/'.join(map(str, path))}; using the shared tensor",
                  file=sys.stderr)
    return out


def _is_fp8(reader, parts) -> bool:
    """Whether every HF tensor of a leaf is an FP8 matrix (a leaf kept as an `Fp8Weight` with `keep_fp8`)."""
    return bool(parts) and all(reader.info(e.key)["dtype"] == F8_DTYPE for e, _ in parts)


def _scale_part(reader, entry, target, blocked) -> np.ndarray:
    """The scale of one FP8 tensor in our layout, kept per 128 elements along `blocked` (a transpose keeps the
    checkpoint's block grid as it is)."""
    s = reader.raw(entry.key + SCALE_SUFFIX).astype(np.float32)
    if target.to_ours is transpose:
        return s.T
    full = np.repeat(np.repeat(s, FP8_BLOCK, 0), FP8_BLOCK, 1)[: entry.shape[0], : entry.shape[1]]
    return compress_scale(target.to_ours(full), blocked)


def fp8_leaf(reader, path, leaf, parts, sharding):
    """An `Fp8Weight` for a leaf whose tensors are FP8: the E4M3 values sliced per device straight from the files
    (as `block` does, without dequantising) and the scale in our layout (small: built whole on the host, then
    placed with the values' sharding where its blocks line up with the values' shards, else replicated)."""
    import jax
    from jax.sharding import NamedSharding

    shape, lead = tuple(leaf.shape), len(parts[0][1].index)
    entry0, t0 = parts[0]
    if len(entry0.shape) != 2:
        raise HFError(f"{reader.where[entry0.key]}: {entry0.key}: FP8 weights kept in memory need [out, in] "
                      f"matrices, got shape {list(entry0.shape)}")
    blocked = blocking(entry0.shape, t0.to_ours, len(shape) - lead)
    blocks = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        key = _ranges(index, shape)
        if key not in blocks:
            blocks[key] = block(reader, path, shape, _np_dtype(F8_DTYPE), index, parts, (), raw=True)
    q = jax.make_array_from_callback(shape, sharding, lambda i, b=blocks, n=shape: b[_ranges(i, n)])
    del blocks
    scale = np.empty(shape[:lead] + scale_shape(shape[lead:], blocked), np.float32)
    for entry, t in parts:
        scale[t.index] = _scale_part(reader, entry, t, blocked)
    spec = scale_spec(sharding.spec, shape, blocked, sharding.mesh)
    return Fp8Weight(q, jax.device_put(scale, NamedSharding(sharding.mesh, spec)), blocked, leaf.dtype)


def fill_sharded(root, reader, leaves: dict, main, copies, shardings: dict, keep_fp8: bool = False) -> None:
    """Place every leaf in its sharding, each process building only its own devices' blocks. `keep_fp8`: a leaf
    whose tensors are all FP8 becomes an `Fp8Weight` (E4M3 values and block scales) instead of dequantised."""
    import jax


    parts = {p: [] for p in leaves}
    for entry in main:
        for t in entry.targets:
            parts[t.path].append((entry, t))
    for entry in main + copies:
        if entry.key in reader.where and tuple(reader.info(entry.key)["shape"]) != entry.shape:
            raise HFError(f"{reader.where[entry.key]}: {entry.key} has shape {reader.info(entry.key)['shape']}, "
                          f"config.json implies {list(entry.shape)}")
    shared = {}
    for e in copies:
        if e.key in reader.where:
            shared.setdefault(e.targets[0].path, []).append(e)
    unfilled = [p for p, leaf in leaves.items()
                if sum(math.prod(leaf.shape[len(t.index):]) for _, t in parts[p]) != math.prod(leaf.shape)]
    if unfilled:
        raise HFError(f"{root}: parameters not covered by the checkpoint: "
                      f"{listing('/'.join(map(str, p)) for p in unfilled)}")
    for path, leaf in leaves.items():
        shape, dtype, sharding = tuple(leaf.shape), np.dtype(leaf.dtype), shardings[path]
        if keep_fp8 and _is_fp8(reader, parts[path]):
            leaf.set_value(fp8_leaf(reader, path, leaf, parts[path], sharding))
            continue
        blocks = {}
        for index in sharding.addressable_devices_indices_map(shape).values():
            key = _ranges(index, shape)
            if key not in blocks:
                blocks[key] = block(reader, path, shape, dtype, index, parts[path], shared.get(path, ()))
        leaf.set_value(jax.make_array_from_callback(shape, sharding,
                                                    lambda i, b=blocks, n=shape: b[_ranges(i, n)]))
        del blocks
