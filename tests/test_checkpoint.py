"""Checkpoints: round trip, fallback past a broken checkpoint, exact resume after SIGKILL (subprocesses, `slow`),
and what a full train.py run writes besides checkpoints: evaluation, the end-of-run sample, TensorBoard."""

import json
import pathlib
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.errors import ConfigError
from dsv3_jax.presets import load_config
from dsv3_jax.train import checkpoint
from tests import xla_env

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS, KILL_AT = 6, 3
ARGS = ["--config", "tiny", f"train.steps={STEPS}", f"train.checkpoint_every={KILL_AT}", "train.log_every=1",
        "train.eval_every=0", "train.sample_tokens=0", "train.warmup_steps=2", "data.seq_len=32",
        "data.max_documents=200", "train.tensorboard=false", "train.async_checkpoint=true"]

# Runs train.main, but SIGKILLs itself at a point chosen by KILL_MODE:
#   after_write: right after the checkpoint of step KILL_AT has been fully written;
#   between:     after step KILL_AT + 1 has trained and logged, before its (not due) save: step KILL_AT + 1 is replayed;
#   during_write: right after the asynchronous save of step KILL_AT has started, without waiting for it.
KILLER = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from dsv3_jax.train import checkpoint
save = checkpoint.Checkpointer.save
mode = os.environ["KILL_MODE"]
def save_then_die(self, step, *args, **kwargs):
    if mode == "between" and step == {KILL_AT} + 1:
        self.wait()  # the step-{KILL_AT} checkpoint is committed; step {KILL_AT} + 1 trained but is not saved
        os.kill(os.getpid(), signal.SIGKILL)
    started = save(self, step, *args, **kwargs)
    if step == {KILL_AT} and mode != "between":
        if mode == "after_write":
            self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return started
checkpoint.Checkpointer.save = save_then_die
import train
sys.exit(train.main(sys.argv[1:]))
"""
# Run A also evaluates, samples at the end and writes TensorBoard (none of which changes the training state).
EXTRAS = ["train.eval_every=3", "train.eval_batches=2", "train.sample_tokens=6", "train.tensorboard=true",
          "train.peak_tflops=0.5"]


def env(tmp_path_factory) -> dict:
    """One device; the session's compilation cache (conftest.py) comes with os.environ."""
    return xla_env.env()


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
    # break step 2: its array files are truncated; restore reports one line, sets step 2 aside and uses step 1
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.suffix != ".json" and "METADATA" not in f.name:
            f.write_bytes(b"broken")
    ck = checkpoint.Checkpointer(tmp_path, every=1, keep=3)
    capfd.readouterr()
    step, state, data_state = ck.restore_latest(abstract(small_state(0)))
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert step == 1 and data_state == {"epoch": 0, "next": 1}
    assert len(warnings) == 1 and "checkpoint step 2" in warnings[0] and "using step 1" in warnings[0], err
    assert "set aside as 2.unrestorable-" in warnings[0] and "Future exception" not in err
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(small_state(1)["params"]["w"]))
    ck.close()
    # set aside once: the broken step is never the newest again, so the next restore is silent
    assert checkpoint.existing_steps(tmp_path) == [1]
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints").glob("2.unrestorable-*")] == ["2.unrestorable"]
    ck = checkpoint.Checkpointer(tmp_path, every=1, keep=3)
    assert ck.restore_latest(abstract(small_state(0)))[0] == 1 and "warning" not in capfd.readouterr().err
    ck.close()


def test_nothing_is_set_aside_when_no_checkpoint_restores(tmp_path, capfd):
    """When every step fails (say the code's state no longer matches), moving them would hide the problem and
    let the next run start from scratch: all stay in place and the error is one line."""
    ck = checkpoint.Checkpointer(tmp_path, every=1, keep=3, async_save=False)
    for step in (1, 2):
        ck.save(step, small_state(step), {"next": step}, load_config("tiny"))
    ck.close()
    other = {**abstract(small_state(0)), "params": {"w": jax.ShapeDtypeStruct((5, 5), jnp.float32)}}
    with pytest.raises(ConfigError, match=r"no checkpoint in .* could be restored \(steps \[1, 2\]; step 2: ") as e:
        checkpoint.Checkpointer(tmp_path, every=1, keep=3).restore_latest(other)
    assert "\n" not in str(e.value) and "<bound method" not in str(e.value)
    assert checkpoint.existing_steps(tmp_path) == [1, 2]
    assert not list((tmp_path / "checkpoints").glob("*.unrestorable-*"))


def _train(args: list[str], e: dict, script: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(script or ["train.py"]), *args], cwd=REPO, env=e, check=False,
                          capture_output=True, text=True, timeout=900)


def test_a_checkpoint_with_the_old_rng_entry_still_restores(tmp_path):
    """Train states saved before `rng` was dropped hold an extra key: it is read and dropped."""
    cfg = load_config("tiny")
    ck = checkpoint.Checkpointer(tmp_path, every=1, keep=2, async_save=False)
    ck.save(1, small_state(1), {"next": 1}, cfg)
    ck.close()
    current = {k: v for k, v in small_state(0).items() if k != "rng"}
    ck = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
    step, state, data_state = ck.restore_latest(abstract(current))
    ck.close()
    assert step == 1 and data_state == {"next": 1} and set(state) == {"step", "params"}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(small_state(1)["params"]["w"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A: STEPS straight (with evaluation, the end-of-run sample and TensorBoard)."""
    a = tmp_path_factory.mktemp("resume") / "a"
    full = _train([*ARGS, *EXTRAS, f"train.run_dir={a}"], env(tmp_path_factory))
    assert full.returncode == 0, full.stderr[-3000:]
    return a, full


def _losses(run_dir: pathlib.Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # each step once: replays were truncated
    return {r["step"]: (r["loss"], r["mtp_loss"], r["grad_norm"]) for r in train}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["after_write", "between", "during_write"])
def test_resume_after_sigkill_is_bit_identical(runs, mode, tmp_path, tmp_path_factory):
    """Killed with SIGKILL (after a checkpoint, between checkpoints, during an asynchronous write), then restarted:
    the steps after the restored checkpoint are replayed, the metrics file holds each step once, and losses,
    parameters and bias equal the uninterrupted run's bit for bit."""
    a, _ = runs
    b = tmp_path / "b"
    e = env(tmp_path_factory)
    killed = _train([*ARGS, f"train.run_dir={b}"], {**e, "KILL_MODE": mode}, ["-c", KILLER])
    assert killed.returncode == -9, killed.stderr[-3000:]
    steps = checkpoint.existing_steps(b)
    assert steps == [KILL_AT] if mode != "during_write" else steps in ([], [KILL_AT]), steps
    if mode == "between":
        logged = [json.loads(ln)["step"] for ln in (b / "metrics.jsonl").read_text().splitlines()]
        assert logged == list(range(1, KILL_AT + 2))  # step KILL_AT + 1 was logged before the kill
    resumed = _train([*ARGS, f"train.run_dir={b}"], e)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if steps:
        assert f"resumed from {b / 'checkpoints' / str(KILL_AT)}" in resumed.stderr
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


@pytest.mark.slow
def test_train_falls_back_past_a_broken_checkpoint(runs, tmp_path, tmp_path_factory):
    """train.py on a run dir whose newest checkpoint is broken: one warning line, resume from the one before,
    the broken step set aside (renamed, not deleted), and the replayed steps equal the original run's."""
    a, _ = runs
    c = tmp_path / "c"
    shutil.copytree(a, c)
    for f in (c / "checkpoints" / str(STEPS) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.suffix != ".json" and "METADATA" not in f.name:
            f.write_bytes(b"broken")
    r = _train([*ARGS, f"train.run_dir={c}"], env(tmp_path_factory))
    assert r.returncode == 0, r.stderr[-3000:]
    # `in`, not startswith: under load another thread's partial stderr line can precede the warning
    warnings = [ln for ln in r.stderr.splitlines() if "warning: checkpoint step" in ln]
    assert len(warnings) == 1 and f"step {STEPS}" in warnings[0] and f"using step {KILL_AT}" in warnings[0], r.stderr
    assert f"resumed from {c / 'checkpoints' / str(KILL_AT)}" in r.stderr
    assert any(p.name.startswith(f"{STEPS}.unrestorable-") for p in (c / "checkpoints").iterdir())
    assert _losses(c) == _losses(a)


@pytest.mark.slow
def test_evaluation_sample_and_tensorboard(runs):
    """Run A's eval rows (steps 3 and 6): the mean next-token loss over the first eval_batches eval batches of the
    checkpointed model, and bits per byte = loss / ln 2 / bytes per token. MFU = tokens/s x FLOPs per token / peak.
    The end-of-run sample is the model's own continuation of the prompt; TensorBoard holds the train and eval
    scalars and the sample text."""
    from tensorboardX.proto import event_pb2

    from dsv3_jax.data import pipeline
    from dsv3_jax.data.tokenizer import ByteTokenizer
    from dsv3_jax.infer import sampling
    from dsv3_jax.train import losses, metrics

    a, full = runs
    rows = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if r["kind"] == "eval"}
    assert sorted(evals) == [KILL_AT, STEPS]
    for step, row in evals.items():
        model, cfg = checkpoint.load_model(a / "checkpoints" / str(step))
        it = pipeline.make_dataset(cfg.data, "eval", cfg.train.global_batch_size, 0, 1, seed=cfg.train.seed)
        total = count = 0.0
        for _, batch in zip(range(cfg.train.eval_batches), it):
            out = model(jnp.asarray(batch["tokens"][:, :-1]), positions=jnp.asarray(batch["positions"][:, :-1]),
                        segment_ids=jnp.asarray(batch["segment_ids"][:, :-1]), mtp=False)
            s, c = losses.next_token_loss(out.logits, jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]))
            total, count = total + float(s), count + float(c)
        np.testing.assert_allclose(row["loss"], total / count, rtol=1e-5)
        bpt = pipeline.split_info(cfg.data, "eval").bytes_per_token
        np.testing.assert_allclose(row["bits_per_byte"], row["loss"] / np.log(2) / bpt, rtol=1e-6)
    model, cfg = checkpoint.load_model(a)
    timed = [r for r in rows if r["kind"] == "train" and np.isfinite(r["tokens_per_s"])]
    assert len(timed) >= STEPS - 2
    fpt = metrics.flops_per_token(cfg.model, cfg.data.seq_len)
    for r in timed:
        np.testing.assert_allclose(r["mfu"], r["tokens_per_s"] * fpt / (cfg.train.peak_tflops * 1e12), rtol=1e-9)
    tok = ByteTokenizer()
    s = cfg.sample
    new = sampling.generate(model, [[tok.bos_id, *tok.encode(cfg.train.sample_prompt)]], cfg.train.sample_tokens,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                            stop_tokens=[tok.eos_id]).tokens[0]
    text = cfg.train.sample_prompt + tok.decode([t for t in new if t != tok.eos_id])
    assert f"--- sample ---\n{text}\n---" in full.stdout
    tags = set()
    for f in (a / "tensorboard").glob("events.out.tfevents.*"):
        raw, i = f.read_bytes(), 0
        while i < len(raw):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            n = int.from_bytes(raw[i:i + 8], "little")
            ev = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            tags |= {v.tag for v in ev.summary.value}
            i += 16 + n
    assert {"train/loss", "train/mfu", "eval/bits_per_byte", "eval/loss"} <= tags, tags
    assert any(t.startswith("sample") for t in tags), tags


@pytest.mark.slow
def test_load_model_restores_params_and_bias(runs):
    a, _ = runs
    from flax import nnx

    from dsv3_jax.model.routing import RouterBias

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


def test_load_model_reads_only_params_and_bias(tmp_path):
    """A checkpoint whose optimizer state matches no optimizer the config could build still loads: `load_model`
    asks orbax for params and bias only (a full-state restore fails on it), and returns exactly the saved ones."""
    from flax import nnx

    from dsv3_jax.model.routing import RouterBias
    from dsv3_jax.model.transformer import Transformer
    from dsv3_jax.train import state as train_state

    cfg = load_config("tiny", [f"train.run_dir={tmp_path}"])
    model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))  # filled below: eager init is slow on CPU
    rng = np.random.default_rng(3)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value(jnp.asarray(rng.standard_normal(var.shape), var.dtype))  # every leaf distinct, bias != 0
    _, params, bias = nnx.split(model, nnx.Param, RouterBias)
    saved = {"step": jnp.array(7, jnp.int32), "params": nnx.to_pure_dict(params), "bias": nnx.to_pure_dict(bias),
             "opt_state": {"not_adamw": jnp.zeros((3,))}}
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
    ckpt.save(7, saved, {"unused": 0}, cfg, force=True)
    ckpt.close()
    with pytest.raises(ConfigError, match="could be restored"):  # the full train state cannot be restored from it
        checkpoint.Checkpointer(tmp_path, 1, 1).restore_latest(train_state.abstract_state(cfg)[0]._asdict())
    loaded, _ = checkpoint.load_model(tmp_path)
    _, got_params, got_bias = nnx.split(loaded, nnx.Param, RouterBias)
    chex.assert_trees_all_equal(nnx.to_pure_dict(got_params), saved["params"])
    chex.assert_trees_all_equal(nnx.to_pure_dict(got_bias), saved["bias"])
