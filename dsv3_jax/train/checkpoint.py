"""Checkpoints: an orbax CheckpointManager around the train state, the data iterator state and the config.

Layout: `RUN_DIR/checkpoints/<step>/{state, data, config}`. `state` is the train state (step, params, router bias,
optimizer state) as plain dicts of arrays; `data` holds one JSON iterator state per process (grain's handler);
`config` is the full Config as JSON, so a step directory is self-contained. Saves are asynchronous and the manager
keeps the last `keep` steps. Restoring is `restore_with_fallback`, for training, `load_model` (sampling,
evaluation) alike: it walks back from the newest step, and once an older one restores, each newer one that failed is
set aside (renamed `<step>.unrestorable-<time>`, never deleted, so it is never the newest again) with one warning line.
`load_model` rebuilds a Transformer from a run or step dir; `read_params` reads another run's params and router bias
into a new run's arrays (train.init_from: a context-extension stage), shapes checked first.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import pathlib
import re
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from dsv3_jax.config import Config, from_dict, upgrade
from dsv3_jax.errors import ConfigError, quiet_unraisable
from dsv3_jax.train import state as train_state

ITEMS = ("state", "data", "config")


LEGACY_KEYS = {"rng": ((2,), "uint32")}  # saved by older versions of the train state; read and dropped


class _IteratorSnapshot:
    """The state of a data iterator frozen at save time (async saves must not read a moving iterator)."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        """Called by grain's restore; nothing to prefetch."""


def _reason(e: BaseException) -> str:
    """An exception as one short line (at most 200 characters) for reports: the innermost cause that says what
    failed (orbax wraps TensorStore's `Error reading "<array>" ...` in a message that prints a bound method)."""
    chain = []
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    for x in reversed(chain):
        text = re.sub(r' in OCDBT database at local file "[^"]*"', "", " ".join(str(x).split()))
        text = text.split(" See full TensorStore details")[0]
        if text and "<bound method" not in text:
            return f"{type(x).__name__}: {text[:200]}"
    return type(chain[0]).__name__


class _DropUnretrievedFutures(logging.Filter):
    """When one array of a broken checkpoint fails to read, the reads of the others are abandoned and asyncio would
    log each of their failures ("Future exception was never retrieved", a traceback each) when they are collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()


_ASYNCIO_FILTER = _DropUnretrievedFutures()


def _abandoned_read(exc_type, exc_value, obj) -> bool:
    """A report about an asynchronous read that a failed restore abandoned: an orbax coroutine collected unfinished,
    or a read finishing after its event loop was closed (TensorStore's callback thread prints that traceback)."""
    code = getattr(obj, "cr_code", None)
    where = f"{getattr(code, 'co_filename', '')} {getattr(obj, '__module__', '')}"
    closed = exc_type is RuntimeError and "Event loop is closed" in str(exc_value)
    return closed or "orbax" in where or "tensorstore" in where


def set_aside(step_dir: pathlib.Path) -> pathlib.Path | None:
    """Rename a checkpoint step dir to `<step>.unrestorable-<time>` (process 0; never deleted). None when it was not
    moved (another process's job, gone already, or a read-only directory)."""
    dst = step_dir.with_name(f"{step_dir.name}.unrestorable-{int(time.time())}")
    if jax.process_index() != 0 or not step_dir.exists():
        return None
    try:
        step_dir.rename(dst)
    except OSError:
        return None
    return dst


T = TypeVar("T")


def restore_with_fallback(ckpt_dir: pathlib.Path, steps: list[int], restore: Callable[[int], T],
                          fallback: bool = True) -> tuple[int, T] | None:
    """(step, restore(step)) for the newest of `steps` that restores; None when there are no steps. Once an older
    step restores, each newer one that failed is set aside with one warning line. When none restores (or
    `fallback` is off: a step dir named explicitly), nothing is moved and the error is one ConfigError line."""
    logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)
    quiet_unraisable(_abandoned_read)  # before: reads abandoned by a failure report while it is still unwinding
    warnings.filterwarnings("ignore", message=r"coroutine '_read_array.*' was never awaited", category=RuntimeWarning)
    steps = sorted(steps, reverse=True)
    failed: list[tuple[int, str]] = []
    for step in steps:
        try:
            restored = restore(step)
        except Exception as e:  # noqa: BLE001  (any failure to read a checkpoint means: try the one before it)
            gc.collect()  # the abandoned reads are finalised now, quietly, not one traceback each later
            if not fallback:
                raise ConfigError(f"checkpoint {ckpt_dir / str(step)} failed to restore ({_reason(e)})") from None
            failed.append((step, _reason(e)))
            continue
        for bad, reason in failed:
            moved = set_aside(ckpt_dir / str(bad))
            aside = f"set aside as {moved.name}" if moved else "left in place"
            print(f"warning: checkpoint step {bad} in {ckpt_dir} failed to restore ({reason}); {aside}; using step "
                  f"{step}", file=sys.stderr, flush=True)
        return step, restored
    if failed:
        raise ConfigError(f"no checkpoint in {ckpt_dir} could be restored (steps {sorted(steps)}; step {failed[0][0]}: "
                          f"{failed[0][1]}); fix or move them, or choose a new train.run_dir")
    return None


def _restore(manager, step: int, abstract_state: dict, **items) -> dict:
    """Restore `state` (and `items`) of one step; a checkpoint written with LEGACY_KEYS in its state is read with
    them and they are dropped, so run dirs of older versions still resume."""
    def attempt(abstract):
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), **items))

    try:
        return attempt(abstract_state)
    except Exception as first:  # noqa: BLE001  (retried with the legacy keys; the first error is the one reported)
        sharding = abstract_state["step"].sharding
        legacy = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in LEGACY_KEYS.items()
                  if k not in abstract_state}
        try:
            restored = attempt({**abstract_state, **legacy})
        except Exception:  # noqa: BLE001
            raise first from None
        state = {k: v for k, v in restored["state"].items() if k not in legacy}
        return {name: state if name == "state" else restored[name] for name in ("state", *items)}


def checkpoint_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(run_dir).absolute() / "checkpoints"


def existing_steps(run_dir: str | pathlib.Path) -> list[int]:
    """Finished checkpoint steps in a run dir, without creating anything."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def saved_config(run_dir: str | pathlib.Path) -> dict | None:
    """The config dict stored with the newest checkpoint that has one (None for a fresh run dir)."""
    for step in reversed(existing_steps(run_dir)):
        for p in (checkpoint_dir(run_dir) / str(step) / "config").glob("*"):
            if p.is_file():
                try:
                    return json.loads(p.read_text())
                except (OSError, ValueError):
                    continue
    return None


class Checkpointer:
    """Save every `every` steps (async, keep last `keep`) and restore the newest restorable checkpoint."""

    def __init__(self, run_dir: str | pathlib.Path, every: int, keep: int, async_save: bool = True):
        self.every = every
        self.dir = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=ITEMS)

    def save(self, step: int, state: dict, data_state: Any, cfg: Config, force: bool = False) -> bool:
        """Start saving `state` at `step` when due (or forced). Returns whether a save started."""
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            self._set_aside(step)
        import grain  # here, not at the top: loading a model (sample, eval, benchmarks) needs no grain

        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state)),
            config=ocp.args.JsonSave(dataclasses.asdict(cfg)),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def _set_aside(self, step: int) -> None:
        """A step that exists but did not restore is renamed, never deleted, before a new save of that step."""
        moved = set_aside(self.dir / str(step))
        if moved:
            print(f"warning: moved unrestorable checkpoint {self.dir / str(step)} to {moved}", file=sys.stderr)
        self.manager.reload()

    def restore_latest(self, abstract_state: dict) -> tuple[int, dict, Any] | None:
        """(step, state, data_state) of the newest checkpoint that restores (`restore_with_fallback`); None when
        there is none."""
        import grain

        def restore(step):
            return _restore(self.manager, step, abstract_state,
                            data=grain.checkpoint.CheckpointRestore(_IteratorSnapshot()))

        found = restore_with_fallback(self.dir, list(self.manager.all_steps()), restore)
        self.manager.reload()  # steps set aside are gone from the manager's list
        if found is None:
            return None
        step, restored = found
        return step, restored["state"], restored["data"].state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _resolve_step_dir(path: pathlib.Path) -> tuple[pathlib.Path, int, bool]:
    """(checkpoints dir, step, whether it is a run dir's newest step) for a run dir or a step dir."""
    path = path.absolute()
    if (path / "state").is_dir() and path.name.isdigit():
        return path.parent, int(path.name), False
    steps = existing_steps(path)
    if steps:
        return checkpoint_dir(path), steps[-1], True
    if path.is_dir() and path.name == "checkpoints":
        return _resolve_step_dir(path.parent)
    raise ConfigError(f"{path} is neither a run dir with checkpoints nor a checkpoint step dir")


def _config_of(ckpt_dir: pathlib.Path, step: int) -> Config:
    files = [p for p in (ckpt_dir / str(step) / "config").glob("*") if p.is_file()]
    if not files:
        raise ConfigError(f"checkpoint {ckpt_dir / str(step)} has no saved config")
    try:
        raw = json.loads(files[0].read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {ckpt_dir / str(step)}: unreadable config ({_reason(e)})") from None
    return from_dict(Config, upgrade(raw)).validate()


def load_config_of(path: str | pathlib.Path) -> tuple[Config, pathlib.Path, int]:
    """The Config saved with a checkpoint, its checkpoints dir and step."""
    ckpt_dir, step, _ = _resolve_step_dir(pathlib.Path(path))
    return _config_of(ckpt_dir, step), ckpt_dir, step


def load_model(path: str | pathlib.Path):
    """(Transformer, Config) from a run dir (its newest checkpoint that restores: `restore_with_fallback`) or a step
    dir (that step): only the parameters and router bias are read (a partial restore; the optimizer state, twice the
    parameters, is never loaded), onto the default device."""
    ckpt_dir, newest, run_dir = _resolve_step_dir(pathlib.Path(path))
    steps = [s for s in existing_steps(ckpt_dir.parent) if s <= newest] if run_dir else [newest]
    absl_log = logging.getLogger("absl")  # orbax announces read-only mode as warnings; reading is all we do
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    manager = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        _, (model, cfg) = restore_with_fallback(ckpt_dir, steps, lambda step: _read_model(manager, ckpt_dir, step),
                                                fallback=run_dir)
    finally:
        manager.close()
        absl_log.setLevel(level)
    return model, cfg


def _read_model(manager, ckpt_dir: pathlib.Path, step: int):
    """(Transformer, Config) of one step: its config, then its params and bias only."""
    from flax import nnx

    cfg = _config_of(ckpt_dir, step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    graphdef, abs_params, abs_bias = train_state.split_abstract(cfg)
    abstract = {"params": nnx.to_pure_dict(abs_params), "bias": nnx.to_pure_dict(abs_bias)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=device, global_shape=x.shape, dtype=x.dtype),
                                abstract)
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    state = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    return nnx.merge(graphdef, state["params"], state["bias"]), cfg


def shape_mismatch(there: dict, here: dict, what: str) -> str | None:
    """One line naming the first array whose shape differs between two pytrees of arrays (or that only one has),
    with how many differ; None when every path has the same shape."""
    a = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(there)}
    b = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(here)}
    bad = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if not bad:
        return None
    k = bad[0]
    return (f"{what}: {len(bad)} of {len(a.keys() | b.keys())} arrays differ, first {k}: "
            f"{a.get(k, 'absent')} there, {b.get(k, 'absent')} here")


def config_changes(src: Config, cfg: Config) -> list[str]:
    """One `section.field: old -> new` line per model field (and data.seq_len) that differs between two configs."""
    old, new = dataclasses.asdict(src), dataclasses.asdict(cfg)
    keys = [("model", k) for k in new["model"]] + [("data", "seq_len")]
    return [f"{s}.{k}: {old[s].get(k)!r} -> {new[s][k]!r}" for s, k in keys if old[s].get(k) != new[s][k]]


def read_params(path: str | pathlib.Path, params: dict, bias: dict) -> tuple[dict, dict, Config]:
    """(params, bias, the source's Config) read from a run dir (its newest step that restores) or a step dir into
    the given abstract arrays (their shapes, dtypes and shardings): the arrays as saved, never re-initialised. The
    source's shapes are checked first: a mismatch is one ConfigError line naming the first differing array. Only
    params and bias are read (a partial restore: no optimizer state)."""
    ckpt_dir, newest, run_dir = _resolve_step_dir(pathlib.Path(path))
    steps = [s for s in existing_steps(ckpt_dir.parent) if s <= newest] if run_dir else [newest]
    src = _config_of(ckpt_dir, newest)
    _, src_params, src_bias = train_state.split_abstract(src)
    from flax import nnx

    there = {"params": nnx.to_pure_dict(src_params), "bias": nnx.to_pure_dict(src_bias)}
    abstract = {"params": params, "bias": bias}
    bad = shape_mismatch(there, abstract, f"train.init_from {path} (step {newest})")
    if bad:
        raise ConfigError(bad)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                               dtype=x.dtype), abstract)
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    manager = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        _, state = restore_with_fallback(
            ckpt_dir, steps, lambda step: manager.restore(step, args=ocp.args.Composite(state=args))["state"],
            fallback=run_dir)
    finally:
        manager.close()
    return state["params"], state["bias"], src
