"""Training telemetry: the progress line, JSONL and TensorBoard writers, FLOPs per token, device peak and MFU.

MFU = achieved model FLOPs/s over the peak of the devices in use. Model FLOPs per trained token follow the usual
6N + attention convention: 6 * (parameters a token multiplies) + 6 * T * H * (qk_head_dim + v_head_dim) per layer
(QK^T and AV, forward and backward, full T keys per query as in the PaLM appendix), MTP layers included.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import hardware
from dsv3_jax.config import ModelConfig
from dsv3_jax.data import atomic
from dsv3_jax.errors import DataError
from dsv3_jax.model.params import count_params


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * activated parameters (head included, embedding lookup not) + attention."""
    counts = count_params(cfg)
    mtp = cfg.num_nextn_predict_layers
    active = counts["activated"] + counts["mtp_activated"] + mtp * cfg.hidden_size * cfg.vocab_size  # shared head
    layers = cfg.num_hidden_layers + mtp
    attention = 6 * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * layers
    return 6.0 * active + attention


MATMUL_N, MATMUL_REPEATS = 1024, 15


def measured_matmul_tflops(n: int = MATMUL_N, repeats: int = MATMUL_REPEATS) -> dict:
    """A float32 matmul benchmark for devices without a table entry (CPU): the median TFLOP/s of `repeats` timed
    runs after a warm-up, and the spread (lowest, highest); a best-of-few read 0.04-0.16 on one loaded machine."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return {"median": float(np.median(rates)), "low": min(rates), "high": max(rates), "repeats": repeats, "n": n}


def cached_matmul_tflops(cache_dir: str | pathlib.Path | None) -> tuple[dict, bool]:
    """The matmul measurement of this machine from `cache_dir/peak_<device kind>_<cores>.json`, measured and stored
    there the first time (None: measured, not stored). Runs on one machine then divide by one number, so their MFU
    compares; returns (measurement, whether it came from the cache)."""
    device = jax.devices()[0]
    name = f"peak_{device.platform}_{''.join(c if c.isalnum() else '-' for c in device.device_kind)}_{os.cpu_count()}"
    path = None if cache_dir is None else pathlib.Path(cache_dir).expanduser() / f"{name}.json"
    if path is not None and path.is_file():
        try:
            got = json.loads(path.read_text())
            if got.get("median", 0) > 0 and got.get("n") == MATMUL_N:
                return got, True
        except (OSError, ValueError, AttributeError):
            pass
    got = {**measured_matmul_tflops(), "measured": time.strftime("%Y-%m-%d %H:%M")}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(path, json.dumps(got) + "\n")
        except OSError:
            pass
    return got, False


def peak_flops(configured_tflops: float | None, devices=None, cache_dir: str | pathlib.Path | None = None
               ) -> tuple[float, str]:
    """Total peak FLOP/s of the devices and where the number came from (printed with it): `train.peak_tflops`, the
    datasheet table (dsv3_jax/hardware.py, the planner's too: the bf16 dense peak of the row naming the device
    kind), or on CPU a matmul measurement (median of repeats, cached per machine in `cache_dir`)."""
    devices = list(jax.devices() if devices is None else devices)
    if configured_tflops:
        return configured_tflops * 1e12 * len(devices), "train.peak_tflops"
    row = hardware.for_device_kind(devices[0].device_kind)
    if row is not None:
        return row.bf16_flops * len(devices), (f"datasheet table, {row.name} bf16 dense "
                                               f"{row.bf16_flops / 1e12:g} TFLOP/s ({devices[0].device_kind})")
    if devices[0].platform == "cpu":  # the CPU devices of one process share its cores: one measurement for all
        m, cached = cached_matmul_tflops(cache_dir)
        where = f"cached {m.get('measured', '')} in {cache_dir}" if cached else "measured now"
        if cache_dir is not None and not cached:
            where += f", cached in {cache_dir}"
        return m["median"] * 1e12 * jax.process_count(), (
            f"float32 matmul, median of {m['repeats']} runs {m['low']:.3g}-{m['high']:.3g} TFLOP/s, {where}")
    return math.nan, f"unknown device kind {devices[0].device_kind!r}"


def scalars(metrics: dict) -> dict[str, float]:
    """Flatten device metrics to named floats: vectors become name/0, name/1, ..."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0:
            out[k] = float(a)
        else:
            for i, x in enumerate(a.reshape(-1)):
                out[f"{k}/{i}"] = float(x)
    return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One `\\r` status line (step, loss, mtp loss, tokens/s, ETA) on process 0 when stderr is a terminal."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled and jax.process_index() == 0 and sys.stderr.isatty()
        self.width = 0

    def update(self, step: int, loss: float, mtp_loss: float, tokens_per_s: float, eta_s: float) -> None:
        if not self.enabled:
            return
        line = (f"step {step}/{self.total} | loss {loss:.4f} | mtp {mtp_loss:.4f} | "
                f"{tokens_per_s:,.0f} tok/s | ETA {format_duration(eta_s)}")
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def clear(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a blank or cut-off one (a killed run's last write)."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return math.inf


class Writer:
    """Metrics to `metrics.jsonl` (one object per record, with `step` and `kind`) and TensorBoard, process 0 only."""

    def __init__(self, run_dir: pathlib.Path, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records beyond `step` (a resumed run re-logs the steps after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= step]
        atomic.write_text(self.path, "".join(ln + "\n" for ln in kept))

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_records(run_dir: str | pathlib.Path) -> list[dict]:
    """The records of `RUN_DIR/metrics.jsonl`; a run dir without one is a one-line FileNotFoundError."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (not a training run dir, or nothing logged yet)")
    lines = [(i, ln) for i, ln in enumerate(path.read_text(errors="replace").splitlines(), 1) if ln.strip()]
    records = []
    for i, ln in lines:
        try:
            record = json.loads(ln)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if i == lines[-1][0]:  # a run killed while writing its last line
                continue
            raise DataError(f"{path}:{i}: not a metrics record (a JSON object per line)")
        records.append(record)
    return records


def series(records: list[dict], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in the records of `kind` ("train" or "eval") that have it."""
    rows = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
    return np.array([s for s, _ in rows], np.int64), np.array([v for _, v in rows], np.float64)


def layer_matrix(record: dict, name: str, num_experts: int) -> np.ndarray:
    """A logged (L, E) matrix back from its flattened `name/i` scalars (row-major, as `scalars` wrote it)."""
    flat = []
    while f"{name}/{len(flat)}" in record:
        flat.append(record[f"{name}/{len(flat)}"])
    return np.array(flat, np.float64).reshape(-1, num_experts)
