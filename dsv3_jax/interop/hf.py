"""Import and export of the HF DeepSeek-V3 checkpoint format: config.json plus safetensors shards.

`load(path) -> Transformer` and `save(model, path)`. Torch stores linear weights [out, in]; ours are [in, out] with
per-head dims split out, and layers stacked into the dense / MoE stacks. The released weights keep each rotary pair
interleaved ((0,1),(2,3),...) (`rope_interleave`), while our rotary uses the half-split layout, so the q_rope rows of
q_b_proj / q_proj and the k_rope rows of kv_a_proj_with_mqa are de-interleaved on import and re-interleaved on
export (dot products are unchanged by a common permutation of q and k dims). MTP module k is HF layer
`num_hidden_layers + k - 1`: a full MoE layer plus enorm, hnorm, eh_proj, shared_head.norm and copies of the shared
embedding and head. FP8 (E4M3) weights come with a `weight_scale_inv` per 128x128 block and are dequantised here.
Every tensor in the files must be used; anything missing or extra is one `HFError` naming the keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import struct
import sys

import numpy as np

from dsv3_jax.config import ImplConfig
from dsv3_jax.errors import ConfigError, HFError
from dsv3_jax.interop.fp8_blocks import dequantize_blocks, quantize_blocks
from dsv3_jax.interop.fp8_layout import FP8_QUANTISED
from dsv3_jax.interop.hf_config import from_hf_config, to_hf_config
from dsv3_jax.interop.hf_format import F8_DTYPE, LAYER_KEY, SCALE_SUFFIX, Entry, entries, listing
from dsv3_jax.interop.hf_sliced import fill_sharded
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel.sharding import MESH_AXES, state_shardings
from dsv3_jax.presets import check_impl


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _read_json(file: pathlib.Path) -> dict:
    if not file.is_file():
        raise HFError(f"{file} not found")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{file}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise HFError(f"{file}: top level must be a JSON object")
    return data


def _header(file: pathlib.Path) -> tuple[dict, int]:
    """The safetensors header {key: {dtype, shape, data_offsets}} and where the data starts; corrupt files fail."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise HFError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        header.pop("__metadata__", None)
        for key, info in header.items():
            begin, end = info["data_offsets"]
            if end > size - 8 - n or begin > end:
                raise HFError(f"{file}: tensor {key} lies outside the file (truncated or corrupt)")
            info["dtype"], info["shape"] = str(info["dtype"]), list(info["shape"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, HFError):
            raise
        raise HFError(f"{file}: malformed safetensors header ({_first_line(e)})") from None
    return header, 8 + n


def _shards(root: pathlib.Path) -> tuple[list[pathlib.Path], dict | None]:
    """The shard files, and the index's weight_map when there is one."""
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFError(f"{index}: no weight_map")
        return [root / f for f in sorted(set(weight_map.values()))], weight_map
    single = root / "model.safetensors"
    if single.exists():
        return [single], None
    raise HFError(f"{root}: no model.safetensors or model.safetensors.index.json")


def _model_config(hf_cfg: dict):
    try:
        return from_hf_config(hf_cfg)
    except (ConfigError, TypeError) as e:
        raise HFError(f"config.json: {e}") from None


def _impl_config(dtype: str, overrides: dict):
    """ImplConfig for `load`: `dtype` sets parameters and activations (bf16 matmuls when not float32)."""
    base = {"dtype": dtype, "param_dtype": dtype, "precision": "fp32" if dtype == "float32" else "bf16"}
    try:
        return check_impl(ImplConfig(**{**base, **overrides}).validate())
    except (ConfigError, TypeError) as e:
        raise HFError(f"load: {e}") from None


def _check_keys(root, cfg, reader: _Reader, main: list[Entry], copies: list[Entry]) -> None:
    """Every expected tensor present and every tensor in the files used (block scales by their FP8 weight),
    else one error listing the keys."""
    keys = reader.where
    expected = {e.key for e in main}
    present = {k for k in keys if not (k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in keys
                                       and reader.info(k[: -len(SCALE_SUFFIX)])["dtype"] == F8_DTYPE)}
    missing = expected - present
    unexpected = present - expected - {e.key for e in copies}
    n = cfg.num_hidden_layers
    for layer in range(n, n + cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{layer}."
        lost = {k for k in missing if k.startswith(prefix)}
        if lost and any(k.startswith(prefix) for k in present):
            raise HFError(f"{root}: MTP layer {layer} is incomplete; missing {listing(lost)}")
    if missing or unexpected:
        parts = [f"missing {listing(missing)}" if missing else "", f"unexpected {listing(unexpected)}"
                 if unexpected else ""]
        raise HFError(f"{root}: tensors do not match config.json: {'; '.join(p for p in parts if p)}")


class _Reader:
    """Reads one tensor at a time from the shards (FP8 weights dequantised with their block scales)."""

    def __init__(self, files: list[pathlib.Path], stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.where, self.headers, self.handles = {}, {}, {}
        self.bytes_read = 0  # tensor bytes read so far (what a sharded load reads per process)
        for file in files:
            if not file.is_file():
                raise HFError(f"{file} not found (listed in the index)")
            self.headers[file] = _header(file)
            for key in self.headers[file][0]:
                if key in self.where:
                    raise HFError(f"{file}: tensor {key} also appears in {self.where[key]}")
                self.where[key] = file
            try:
                self.handles[file] = stack.enter_context(safe_open(str(file), framework="np"))
            except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
                raise HFError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None

    def info(self, key: str) -> dict:
        return self.headers[self.where[key]][0][key]

    def raw(self, key: str) -> np.ndarray:
        file = self.where[key]
        info = self.info(key)
        self.bytes_read += info["data_offsets"][1] - info["data_offsets"][0]
        try:
            if info["dtype"] == F8_DTYPE:  # safetensors' numpy backend has no float8: read the bytes directly
                import ml_dtypes

                return np.fromfile(file, ml_dtypes.float8_e4m3fn, count=math.prod(info["shape"]),
                                   offset=self.headers[file][1] + info["data_offsets"][0]).reshape(info["shape"])
            return self.handles[file].get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise HFError(f"{file}: cannot read tensor {key} ({_first_line(e)})") from None

    def get(self, key: str) -> np.ndarray:
        a = self.raw(key)
        if self.info(key)["dtype"] != F8_DTYPE:
            return a
        if key + SCALE_SUFFIX not in self.where:
            raise HFError(f"{self.where[key]}: FP8 tensor {key} has no {key + SCALE_SUFFIX}")
        try:
            return dequantize_blocks(a, self.raw(key + SCALE_SUFFIX))
        except ValueError as e:
            raise HFError(f"{self.where[key]}: {key}: {e}") from None


def load(path, dtype: str = "float32", mesh=None, stats: dict | None = None, keep_fp8: bool = False,
         rules: dict | None = None, **impl_overrides):
    """Transformer from an HF DeepSeek-V3 directory (config.json + safetensors), filled leaf by leaf from the
    tensors of the files (the host holds one parameter at a time). With a `mesh`, each parameter is placed
    directly in its logical-axis sharding and each process reads only the slices its devices hold
    (hf_sliced.py). `dtype` sets the
    parameter and activation dtypes; `impl_overrides` are further `impl` fields (precision, moe_impl, ...).
    `stats`, when given, receives `bytes_read`: the tensor bytes this process read from the files.
    `keep_fp8`: FP8 weights stay E4M3 with their block scales (`kernels.fp8_weights.Fp8Weight`, dequantised where
    a matmul reads them), sliced per device like the rest (on one device without a mesh). `rules`: the
    logical-axis table that places the parameters on the mesh (default: the current one)."""
    from flax import nnx


    root = pathlib.Path(path)
    if not root.is_dir():
        raise HFError(f"{root} is not a directory")
    hf_cfg = _read_json(root / "config.json")
    cfg, impl = _model_config(hf_cfg), _impl_config(dtype, impl_overrides)
    files, weight_map = _shards(root)
    with contextlib.ExitStack() as stack:
        reader = _Reader(files, stack)
        keys = reader.where
        unlisted = set(weight_map or ()) - set(keys)
        if unlisted:
            raise HFError(f"{root / 'model.safetensors.index.json'} lists tensors its shards lack: "
                          f"{listing(unlisted)}")
        n = cfg.num_hidden_layers
        if cfg.num_nextn_predict_layers and not any(int(m.group(1)) >= n for k in keys if (m := LAYER_KEY.match(k))):
            print(f"note: {root} has no MTP tensors (model.layers.{n}.*); loading with MTP off "
                  "(num_nextn_predict_layers=0)", file=sys.stderr)
            cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
        fused = frozenset(int(m.group(1)) for k in keys if k.endswith("mlp.experts.gate_up_proj")
                          and (m := LAYER_KEY.match(k)))
        main, copies = entries(cfg, hf_cfg.get("rope_interleave", True) is not False, fused)
        _check_keys(root, cfg, reader, main, copies)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), impl)))
        leaves = dict(nnx.to_flat_state(state))
        if mesh is None and keep_fp8:
            mesh = single_device_mesh()
        if mesh is None:
            _fill(root, reader, leaves, main, copies)
        else:
            shardings = {p: v.get_value() for p, v in nnx.to_flat_state(state_shardings(state, mesh, rules))}
            fill_sharded(root, reader, leaves, main, copies, shardings, keep_fp8)
        if stats is not None:
            stats["bytes_read"] = reader.bytes_read
    return nnx.merge(graphdef, state)


def single_device_mesh():
    """A mesh of this process's first device (every axis 1): where FP8 weights are kept without a mesh."""
    import jax

    return jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


def _leaf_groups(leaves: dict, parts: dict) -> list[list[tuple]]:
    """Leaves that share a tensor (fused gate_up_proj fills w_gate and w_up) form one group, so that each tensor
    in the files is read once."""
    groups, seen = [], set()
    for path in leaves:
        if path in seen:
            continue
        group, frontier = [], [path]
        while frontier:
            p = frontier.pop()
            if p in seen:
                continue
            seen.add(p)
            group.append(p)
            frontier += [t.path for entry, _ in parts[p] for t in entry.targets]
        groups.append(group)
    return groups


def _fill(root, reader: _Reader, leaves: dict, main: list[Entry], copies: list[Entry]) -> None:
    """Build each group of leaves from the entries that target it, place it and drop the host buffers before the
    next group (the single-device path; a mesh goes through hf_sliced.fill_sharded)."""
    import jax.numpy as jnp

    parts = {p: [] for p in leaves}  # leaf path -> [(entry, target)]
    for entry in main:
        for t in entry.targets:
            parts[t.path].append((entry, t))
    shared = {}  # leaf path -> the copies of it stored with the MTP layers
    for e in copies:
        if e.key in reader.where:
            shared.setdefault(e.targets[0].path, []).append(e)
    unfilled = []
    for group in _leaf_groups(leaves, parts):
        buffers = {p: np.empty(leaves[p].shape, np.dtype(leaves[p].dtype)) for p in group}
        filled = dict.fromkeys(group, 0)
        entries_in_group = {entry.key: entry for p in group for entry, _ in parts[p]}
        for entry in entries_in_group.values():
            a = reader.get(entry.key)
            if tuple(a.shape) != entry.shape:
                raise HFError(f"{reader.where[entry.key]}: {entry.key} has shape {list(a.shape)}, config.json "
                              f"implies {list(entry.shape)}")
            for t in entry.targets:
                part = t.to_ours(a)
                buffers[t.path][t.index] = part
                filled[t.path] += part.size
        for path in group:
            buffer = buffers.pop(path)
            if filled[path] != buffer.size:
                unfilled.append("/".join(map(str, path)))
                continue
            for entry in shared.get(path, ()):
                a = reader.get(entry.key)
                if tuple(a.shape) != entry.shape or not np.array_equal(
                        entry.targets[0].to_ours(a).astype(buffer.dtype), buffer):
                    print(f"warning: {entry.key} differs from the shared {'/'.join(path)}; using the shared tensor",
                          file=sys.stderr)
            leaves[path].set_value(jnp.asarray(buffer))
    if unfilled:
        raise HFError(f"{root}: parameters not covered by the checkpoint: {listing(unfilled)}")


_FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def save(model, path, dtype: str = "float32", shard_size_mb: float = 4096, fp8: bool = False) -> None:
    """Write config.json and safetensors shards + index in the HF layout (per-expert keys, MTP as layer
    num_hidden_layers with copies of the embedding and head), readable by `load` and by transformers.

    fp8=True writes the released FP8 layout: the attention and MLP projection weights as E4M3 with a float32
    `weight_scale_inv` [ceil(out/128), ceil(in/128)] per 128x128 block, everything else in `dtype`."""
    import ml_dtypes
    from flax import nnx
    from safetensors.numpy import save_file


    cfg = model.cfg
    out_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(dtype)
    if out_dtype is None:
        raise HFError(f"save dtype must be float32, bfloat16 or float16, got {dtype!r}")
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    hf_cfg = to_hf_config(cfg)
    hf_cfg["torch_dtype"] = dtype
    if fp8:
        hf_cfg["quantization_config"] = dict(_FP8_CONFIG)
    (root / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")

    leaves = {p: var.get_value() for p, var in nnx.to_flat_state(nnx.state(model))}
    main, copies = entries(cfg)
    todo = main + copies

    def quantised(entry):
        return fp8 and FP8_QUANTISED.search(entry.key) is not None

    def dtype_of(entry):  # the router and its bias stay float32, as in the released weights
        if quantised(entry):
            return ml_dtypes.float8_e4m3fn
        return np.float32 if entry.targets[0].path[-1] in ("router", "bias") else out_dtype

    def tensors_of(entry) -> dict:
        t = entry.targets[0]
        w = entry.to_hf(np.asarray(leaves[t.path][t.index]))
        if not quantised(entry):
            return {entry.key: np.ascontiguousarray(w.astype(dtype_of(entry)))}
        q, scale_inv = quantize_blocks(w.astype(np.float32))
        return {entry.key: np.ascontiguousarray(q), entry.key + SCALE_SUFFIX: scale_inv}

    limit = shard_size_mb * 2**20
    shards, size = [[]], 0
    for entry in todo:
        nbytes = math.prod(entry.shape) * np.dtype(dtype_of(entry)).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for entry in shard:
            tensors.update(tensors_of(entry))
        for key, a in tensors.items():
            weight_map[key] = name
            total += a.nbytes
        save_file(tensors, str(root / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
