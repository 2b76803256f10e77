"""Ctrl-C (SIGINT) during start-up, data preparation, tokenizer training, compilation and training: one line, status
130, and nothing half-written: no temporary left, no output that is not whole (a rerun resumes or starts clean)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.xla_env import env

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--config", "tiny", "train.steps=3", "train.checkpoint_every=1000", "train.eval_every=0",
        "train.sample_tokens=0", "data.seq_len=32", "train.tensorboard=false", "train.peak_tflops=1"]


def interrupt(cmd: list[str], cwd: pathlib.Path, after_s: float = 0.0,
              after_line: str | None = None) -> tuple[int, str]:
    """Start `cmd` in a process group of its own and send SIGINT to the group, as Ctrl-C in a terminal does (worker
    processes get it too), `after_s` seconds after it printed a line containing `after_line` (or after its start);
    (exit status, everything it printed)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    if after_line is not None:
        for line in proc.stdout:
            seen.append(line)
            if after_line in line:
                break
    time.sleep(after_s)
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=600)
    return proc.returncode, "".join(seen) + rest


def assert_one_line(code: int, out: str, line: str = "interrupted (Ctrl-C)", progress: tuple[str, ...] = ()):
    """Status 130 and, besides the command's own progress lines (`progress` prefixes), exactly the one line."""
    assert code == 130, out[-3000:]
    rest = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith(progress)]
    assert len(rest) == 1 and line in rest[0], out[-3000:]


def no_temporaries(root: pathlib.Path) -> list[str]:
    return [str(p) for p in root.rglob(".*.tmp")]


def big_corpus(path: pathlib.Path, mb: int) -> None:
    """About `mb` MB of JSONL documents of varied made-up words (a BPE has merges to learn from them)."""
    rng = np.random.default_rng(0)
    words = np.array(["".join(w) for w in rng.choice(list("abcdefghijklmnopqrstuvwxyz"), (20_000, 7))])
    n_docs = mb * 2**20 // 400
    text = [" ".join(words[rng.integers(0, len(words), 50)]) for _ in range(n_docs)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in text))


def test_ctrl_c_at_start_up(tmp_path):
    """train.py interrupted while it imports and starts JAX: one line, and no run dir or data cache half made."""
    code, out = interrupt([sys.executable, str(REPO / "train.py"), *TINY, "train.run_dir=run",
                           "data.cache_dir=cache"], tmp_path, after_s=1.0)
    assert_one_line(code, out)
    assert not no_temporaries(tmp_path)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("tool", [
    ["dsv3_jax.tools.plan", "--config", "tiny", "--devices", "1"],
    ["dsv3_jax.tools.bench", "--quick", "--config", "tiny", "--only", "compile"],
    ["dsv3_jax.tools.bench_decode", "--quick", "--new-tokens", "4", "--batches", "1", "--checkpoint", "absent"],
    ["dsv3_jax.tools.plot", "absent", "--out", "plots"],
], ids=lambda tool: tool[0].rsplit(".", 1)[-1])
def test_ctrl_c_at_start_up_of_a_tool(tmp_path, tool):
    """1 s in, while the tool imports jax: one line and 130. A tool whose module imported jax (or numpy) before its
    error path was installed printed a KeyboardInterrupt traceback, or lost the interrupt in jax's gc callback and
    ran on to the end with status 0."""
    code, out = interrupt([sys.executable, "-m", *tool], tmp_path, after_s=1.0)
    assert_one_line(code, out)


def test_ctrl_c_while_preparing_keeps_finished_shards_only(tmp_path):
    """prepare with 2 worker processes, interrupted after its first shard: one line (the workers leave Ctrl-C to
    the parent), no temporary, no manifest; a rerun resumes and finishes."""
    big_corpus(tmp_path / "big.jsonl", 24)
    cmd = [sys.executable, "-m", "dsv3_jax.tools.prepare", "--source", "big.jsonl", "--out", "prepared",
           "--processes", "2", "--shard-mb", "1"]
    code, out = interrupt(cmd, tmp_path, after_line="shard 1/")
    assert_one_line(code, out, progress=("shard ",))
    assert not no_temporaries(tmp_path) and not (tmp_path / "prepared" / "manifest.json").exists()
    finished = list((tmp_path / "prepared" / "shards").glob("*.json"))
    assert finished and len(finished) < 24
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0 and (tmp_path / "prepared" / "manifest.json").is_file(), r.stderr[-2000:]


def test_ctrl_c_while_training_a_tokenizer_writes_no_file(tmp_path):
    """About 3 s of training (16 MB, vocabulary 20,000), interrupted after 1.2 s: no tokenizer.json at all."""
    big_corpus(tmp_path / "big.jsonl", 16)
    code, out = interrupt([sys.executable, "-m", "dsv3_jax.tools.tokenizer", "train", "--source", "big.jsonl",
                           "--vocab-size", "20000", "--out", "tok.json"], tmp_path, after_s=1.2)
    assert_one_line(code, out)
    assert not (tmp_path / "tok.json").exists() and not no_temporaries(tmp_path)


@pytest.mark.slow
def test_ctrl_c_while_compiling_saves_the_step_and_stops(tmp_path):
    """During the first step's compilation: the step finishes, its checkpoint is written whole, status 130."""
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                                                 for i in range(200)))
    code, out = interrupt([sys.executable, str(REPO / "train.py"), *TINY, "train.run_dir=run", "data.source=data.jsonl",
                           "data.cache_dir=cache"], tmp_path, after_s=0.5, after_line="tokens/step")
    assert_one_line(code, out, "stopped by signal 2 after step 1; checkpoint saved in", ("preparing", "model "))
    from dsv3_jax.train import checkpoint

    assert checkpoint.existing_steps(tmp_path / "run") == [1] and not no_temporaries(tmp_path)
    _, cfg = checkpoint.load_model(tmp_path / "run")
    assert cfg.train.steps == 3


@pytest.mark.slow
def test_ctrl_c_while_the_planner_compiles(tmp_path):
    """plan of two sequence lengths, interrupted just after the first plan's JSON, while the second is lowered and
    compiled: one line, status 130 (XLA's fd-2 output captured during the compile is not replayed as noise)."""
    code, out = interrupt([sys.executable, "-m", "dsv3_jax.tools.plan", "--config", "tiny", "--devices", "1",
                           "--seq-len", "32", "64", "--json"], tmp_path, after_s=0.3, after_line='"compile_s"')
    assert_one_line(code, out, progress=("{",))
    assert '"seq_len": 32' in out and '"seq_len": 64' not in out  # the second plan was stopped, not finished


@pytest.mark.slow
def test_ctrl_c_while_the_benchmark_compiles(tmp_path):
    """bench's compile section (the train step lowered and compiled at two depths), interrupted 0.5 s after the
    matmul line: one line, status 130, no table."""
    code, out = interrupt([sys.executable, "-m", "dsv3_jax.tools.bench", "--quick", "--config", "tiny", "--only",
                           "compile"], tmp_path, after_s=0.5, after_line="(a) matmul")
    assert_one_line(code, out, progress=("(a) matmul",))
    assert "| section |" not in out
