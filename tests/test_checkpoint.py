"""Checkpoints: round trip, fallback past a broken checkpoint, and exact resume after SIGKILL (subprocess)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import checkpoint
from dsv3_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS, KILL_AT = 6, 3
ARGS = ["--config", "tiny", f"train.steps={STEPS}", f"train.checkpoint_every={KILL_AT}", "train.log_every=1",
        "train.eval_every=0", "train.sample_tokens=0", "train.warmup_steps=2", "data.seq_len=32",
        "data.max_documents=200", "train.tensorboard=false", "train.async_checkpoint=true"]

# Runs train.main, but SIGKILLs itself right after the checkpoint of step KILL_AT has been written.
KILLER = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from dsv3_jax import checkpoint
save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args, **kwargs):
    started = save(self, step, *args, **kwargs)
    if step == {KILL_AT}:
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return started
checkpoint.Checkpointer.save = save_then_die
import train
sys.exit(train.main(sys.argv[1:]))
"""


def env(tmp_path_factory) -> dict:
    e = dict(os.environ)
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "jax_cache")
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e.pop("XLA_FLAGS", None)
    return e


def small_state(seed: int) -> dict:
    k = jax.random.PRNGKey(seed)
    return {"step": jnp.int32(seed), "params": {"w": jax.random.normal(k, (3, 4)), "0": {"b": jnp.arange(5.0)}},
            "rng": k}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_round_trip_and_fallback_past_a_broken_checkpoint(tmp_path, capfd):
    cfg = load_config("tiny")
    ck = checkpoint.Checkpointer(tmp_path, every=1, keep=3)
    for step in (1, 2):
        ck.save(step, small_state(step), {"epoch": 0, "next": step}, cfg)
    ck.close()
    ck = checkpoint.Checkpointer(tmp_path, every=1, keep=3)
    step, state, data_state = ck.restore_latest(abstract(small_state(0)))
    assert step == 2 and data_state == {"epoch": 0, "next": 2}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(small_state(2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ck.close()
    # break step 2: its array files are truncated; restore reports one line and falls back to step 1
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.suffix != ".json" and "METADATA" not in f.name:
            f.write_bytes(b"broken")
    ck = checkpoint.Checkpointer(tmp_path, every=1, keep=3)
    capfd.readouterr()
    step, state, data_state = ck.restore_latest(abstract(small_state(0)))
    err = [ln for ln in capfd.readouterr().err.splitlines() if "warning" in ln]
    assert step == 1 and data_state == {"epoch": 0, "next": 1}
    assert len(err) == 1 and "checkpoint step 2" in err[0] and "trying step 1" in err[0]
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(small_state(1)["params"]["w"]))
    ck.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A: STEPS straight. Run B: killed with SIGKILL after the step-KILL_AT checkpoint, then restarted."""
    base = tmp_path_factory.mktemp("resume")
    e = env(tmp_path_factory)
    a, b = base / "a", base / "b"
    full = subprocess.run([sys.executable, "train.py", *ARGS, f"train.run_dir={a}"], cwd=REPO, env=e,
                          check=False, capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = subprocess.run([sys.executable, "-c", KILLER, *ARGS, f"train.run_dir={b}"], cwd=REPO, env=e,
                            check=False, capture_output=True, text=True, timeout=900)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoint.existing_steps(b) == [KILL_AT]
    resumed = subprocess.run([sys.executable, "train.py", *ARGS, f"train.run_dir={b}"], cwd=REPO, env=e,
                             check=False, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {b / 'checkpoints' / str(KILL_AT)}" in resumed.stderr
    return a, b


def _losses(run_dir: pathlib.Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    return {r["step"]: (r["loss"], r["mtp_loss"], r["grad_norm"]) for r in train}


def test_resume_after_sigkill_is_bit_identical(runs):
    a, b = runs
    assert _losses(a) == _losses(b)
    model_a, cfg_a = checkpoint.load_model(a)
    model_b, cfg_b = checkpoint.load_model(b)
    assert cfg_a.model == cfg_b.model
    from flax import nnx

    leaves_a = jax.tree.leaves(nnx.state(model_a))
    leaves_b = jax.tree.leaves(nnx.state(model_b))
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_model_restores_params_and_bias(runs):
    a, _ = runs
    from flax import nnx

    from dsv3_jax.moe import RouterBias

    model, cfg = checkpoint.load_model(a / "checkpoints" / str(STEPS))
    assert cfg.train.steps == STEPS and cfg.data.seq_len == 32
    bias = jax.tree.leaves(nnx.state(model, RouterBias))
    # the bias moved by +/- gamma per step: every entry is a multiple of gamma, and not all are zero
    moved = np.concatenate([np.asarray(x).reshape(-1) for x in bias])
    assert np.abs(moved).max() > 0
    np.testing.assert_allclose(moved / cfg.train.bias_gamma, np.round(moved / cfg.train.bias_gamma), atol=1e-3)
    ids = jnp.array([[0, 40, 41, 42]], jnp.int32)
    assert np.isfinite(np.asarray(model(ids).logits)).all()
    older, _ = checkpoint.load_model(a / "checkpoints" / str(KILL_AT))
    w_new = np.asarray(nnx.state(model, nnx.Param)["head"]["weight"][...])
    w_old = np.asarray(nnx.state(older, nnx.Param)["head"]["weight"][...])
    assert not np.array_equal(w_new, w_old)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, tmp_path_factory):
    """SIGTERM mid-run: the step in progress finishes, a checkpoint of it is written, the exit status is 128+15,
    and the run resumes from that step."""
    import signal
    import time

    run = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith(("train.steps=", "train.checkpoint_every="))]
    cmd = [sys.executable, "train.py", *args, "train.steps=500", "train.checkpoint_every=1000", f"train.run_dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(tmp_path_factory), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.time() + 600
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    steps = checkpoint.existing_steps(run)
    assert len(steps) == 1 and 2 <= steps[0] < 500, steps
    assert "stopped by signal 15" in rest
    _, cfg = checkpoint.load_model(run)
    assert cfg.train.steps == 500
