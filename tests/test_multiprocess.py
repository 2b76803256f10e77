"""Two CPU processes (gloo, 2 devices each) train exactly like one process with 4 devices."""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.xla_env import env as _env

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 5
ARGS = ["--config", "tiny", f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "train.sample_tokens=0",
        "train.checkpoint_every=100", "train.global_batch_size=8", "data.seq_len=32", "data.max_documents=200",
        "train.tensorboard=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_rows(run_dir: pathlib.Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path):
    single = subprocess.run([sys.executable, "train.py", *ARGS, f"train.run_dir={tmp_path / 'one'}"], cwd=REPO,
                            env=_env(4), check=False, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "train.py", *ARGS, f"train.run_dir={tmp_path / 'two'}",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "4 devices" in outs[0][1]

    one, two = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "maxvio_mean", "bias_std"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5, atol=1e-5, err_msg=key)
