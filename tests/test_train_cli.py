"""train.py on bad input: one `error:` line, exit status 2, and an existing checkpoint left exactly as it was.

Each case runs train.py against a finished run dir (a full CLI run: `slow`)."""

import pathlib
import subprocess
import sys

import pytest

from tests.xla_env import env as _env

REPO = pathlib.Path(__file__).resolve().parent.parent
BASE = ["--config", "tiny", "train.steps=2", "train.checkpoint_every=2", "train.eval_every=0", "train.sample_tokens=0",
        "data.seq_len=32", "data.max_documents=100", "train.tensorboard=false"]


def _listing(run_dir: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "run"
    r = subprocess.run([sys.executable, "train.py", *BASE, f"train.run_dir={d}"], cwd=REPO, env=_env(),
                       check=False, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (d / "checkpoints" / "2").is_dir()
    return d


CASES = {
    "missing data glob": (["data.source=/nonexistent/dir/*.txt"], None, "/nonexistent/dir"),
    "empty data glob": (["data.source={empty}/*.txt"], None, "empty"),
    "seq_len beyond max positions": (["data.seq_len=1024"], None, "max_position_embeddings"),
    "batch not divisible by data parallel": (["train.global_batch_size=6"], 4, "data-parallel"),
    "batch not divisible by micro batches": (["train.micro_batches=3"], None, "micro_batches"),
    "unknown config key": (["train.stepz=3"], None, "stepz"),
    "fp8 contraction too small": (["impl.precision=fp8"], None, "model.kv_lora_rank"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_leaves_the_checkpoint_alone(case, run_dir, tmp_path):
    overrides, devices, must_name = CASES[case]
    (tmp_path / "empty").mkdir()
    overrides = [o.format(empty=tmp_path / "empty") for o in overrides]
    before = _listing(run_dir)
    r = subprocess.run([sys.executable, "train.py", *BASE, f"train.run_dir={run_dir}", *overrides], cwd=REPO,
                       env=_env(devices), check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert must_name in errors[0], errors[0]
    assert _listing(run_dir) == before


def test_token_id_beyond_the_vocabulary_is_rejected_by_the_data_check(tmp_path):
    """A fresh run dir, so no run-dir check can reject the smaller vocabulary: only the data's token-id check can."""
    run = tmp_path / "fresh"
    r = subprocess.run([sys.executable, "train.py", *BASE, f"train.run_dir={run}", "model.vocab_size=100"], cwd=REPO,
                       env=_env(), check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "token id" in errors[0] and "is >= model vocab_size 100" in errors[0], errors[0]
    assert not (run / "checkpoints").exists()


def test_default_arguments_name_the_small_preset():
    sys.path.insert(0, str(REPO))
    import train

    args = train.parse_args([])
    assert args.config == "small" and args.overrides == []


@pytest.mark.slow
def test_resumes_with_a_different_impl(run_dir, tmp_path):
    """A run dir pins the architecture, not the implementation: a run moved to bf16 matmuls and full remat resumes
    from its checkpoint and goes on."""
    import json
    import shutil

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    r = subprocess.run([sys.executable, "train.py", *BASE, f"train.run_dir={moved}", "train.steps=4",
                        "impl.precision=bf16", "impl.remat=full"], cwd=REPO, env=_env(), check=False,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {moved / 'checkpoints' / '2'}" in r.stderr
    assert (moved / "checkpoints" / "4").is_dir()
    impl = json.loads((moved / "run_config.json").read_text())["impl"]
    assert (impl["precision"], impl["remat"]) == ("bf16", "full")


@pytest.mark.slow
def test_resume_restores_without_initialising(run_dir, tmp_path, monkeypatch):
    """A resume restores straight into the sharded abstract state: the fresh-state initialiser is never called."""
    import shutil

    from dsv3_jax.presets import load_config
    from dsv3_jax.train import loop

    def no_init(*args, **kwargs):
        raise AssertionError("a resume initialised a fresh train state")

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    monkeypatch.setattr(loop, "init_state", no_init)
    overrides = [a for a in BASE[2:]] + [f"train.run_dir={moved}", "train.steps=3", "train.progress=false"]
    loop.train(load_config("tiny", overrides))
    assert (moved / "checkpoints" / "3").is_dir()
    fresh = tmp_path / "fresh"
    with pytest.raises(AssertionError, match="initialised"):  # and a fresh run does initialise
        loop.train(load_config("tiny", overrides[:-2] + [f"train.run_dir={fresh}", "train.steps=3"]))
