"""Checkpoints: an orbax CheckpointManager around the train state, the data iterator state and the config.

Layout: `RUN_DIR/checkpoints/<step>/{state, data, config}`. `state` is the train state (step, params, router bias,
optimizer state) as plain dicts of arrays; `data` holds one JSON iterator state per process (grain's handler);
`config` is the full Config as JSON, so a step directory is self-contained. Saves are asynchronous and the manager
keeps the last `keep` steps. Restoring walks back from the newest step: a checkpoint that fails to restore is
reported in one line and the one before it is used. `load_model` rebuilds a Transformer from a run or step dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from dsv3_jax.config import Config, from_dict, upgrade
from dsv3_jax.errors import ConfigError
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


def _reason(e: Exception) -> str:
    """An exception as `Type: first line` (at most 200 characters), for one-line reports."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state)),
            config=ocp.args.JsonSave(dataclasses.asdict(cfg)),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def _set_aside(self, step: int) -> None:
        """A step that exists but did not restore is renamed, never deleted, before a new save of that step."""
        src = self.dir / str(step)
        dst = self.dir / f"{step}.unrestorable-{int(time.time())}"
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
            print(f"warning: moved unrestorable checkpoint {src} to {dst}", file=sys.stderr)
        self.manager.reload()

    def restore_latest(self, abstract_state: dict) -> tuple[int, dict, Any] | None:
        """(step, state, data_state) of the newest checkpoint that restores; None when there is none."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                restored = _restore(self.manager, step, abstract_state,
                                    data=grain.checkpoint.CheckpointRestore(_IteratorSnapshot()))
                return step, restored["state"], restored["data"].state
            except Exception as e:  # noqa: BLE001  (any failure means: fall back to the previous checkpoint)
                nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
                print(f"warning: checkpoint step {step} in {self.dir} failed to restore ({_reason(e)}); {nxt}",
                      file=sys.stderr)
        if steps:
            raise ConfigError(f"no checkpoint in {self.dir} could be restored (steps {sorted(steps)}); "
                              "fix or move them, or choose a new train.run_dir")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _resolve_step_dir(path: pathlib.Path) -> tuple[pathlib.Path, int]:
    """(checkpoints dir, step) for a run dir (newest step) or a step dir."""
    path = path.absolute()
    if (path / "state").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    steps = existing_steps(path)
    if steps:
        return checkpoint_dir(path), steps[-1]
    if path.is_dir() and path.name == "checkpoints":
        return _resolve_step_dir(path.parent)
    raise ConfigError(f"{path} is neither a run dir with checkpoints nor a checkpoint step dir")


def load_config_of(path: str | pathlib.Path) -> tuple[Config, pathlib.Path, int]:
    """The Config saved with a checkpoint, its checkpoints dir and step."""
    ckpt_dir, step = _resolve_step_dir(pathlib.Path(path))
    files = [p for p in (ckpt_dir / str(step) / "config").glob("*") if p.is_file()]
    if not files:
        raise ConfigError(f"checkpoint {ckpt_dir / str(step)} has no saved config")
    return from_dict(Config, upgrade(json.loads(files[0].read_text()))).validate(), ckpt_dir, step


def load_model(path: str | pathlib.Path):
    """(Transformer, Config) from a run dir (newest checkpoint) or a step dir: only the parameters and router bias
    are read (a partial restore; the optimizer state, twice the parameters, is never loaded), onto the default
    device."""
    from flax import nnx

    cfg, ckpt_dir, step = load_config_of(path)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    graphdef, abs_params, abs_bias = train_state.split_abstract(cfg)
    abstract = {"params": nnx.to_pure_dict(abs_params), "bias": nnx.to_pure_dict(abs_bias)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=device, global_shape=x.shape, dtype=x.dtype),
                                abstract)
    absl_log = logging.getLogger("absl")  # orbax announces read-only mode as warnings; reading is all we do
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    manager = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
        state = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"checkpoint {ckpt_dir / str(step)} failed to restore ({_reason(e)})") from None
    finally:
        manager.close()
        absl_log.setLevel(level)
    return nnx.merge(graphdef, state["params"], state["bias"]), cfg
