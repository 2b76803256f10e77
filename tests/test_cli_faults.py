"""Every command on bad input (tests/cli_faults.py): one `error:` line and status 2 (or, past a broken newest
checkpoint, one `warning:` line and status 0), no traceback, no asyncio noise, no file left half-written or written
at all where the input was refused. The cases without a model run in one process; those that need a trained run dir
in another (`slow`: they train one first)."""

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tests import cli_faults
from tests.xla_env import env

REPO = pathlib.Path(__file__).resolve().parent.parent
WITHOUT_RUN = [c for c in cli_faults.CASES if c.run is None]
WITH_RUN = [c for c in cli_faults.CASES if c.run is not None]


@pytest.fixture(scope="module")
def without_run(tmp_path_factory):
    return cli_faults.run_groups(WITHOUT_RUN, tmp_path_factory.mktemp("faults"), "-", env())


def _train(args: list[str], data: pathlib.Path, cache: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "--config", "tiny", "train.checkpoint_every=2",
                           "train.eval_every=0", "train.sample_tokens=0", "data.seq_len=32", "train.tensorboard=false",
                           f"data.source={data / 'good.jsonl'}", f"data.cache_dir={cache}", "train.peak_tflops=1",
                           *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run dir with checkpoints at steps 2 and 4, trained on cli_faults' good.jsonl."""
    root = tmp_path_factory.mktemp("faults_run")
    cli_faults.make_inputs(root / "data")
    r = _train(["train.steps=4", f"train.run_dir={root / 'trained'}"], root / "data", root / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def with_run(trained):
    return cli_faults.run_groups(WITH_RUN, trained / "cases", str(trained / "trained"), env())


@pytest.mark.parametrize("case", WITHOUT_RUN, ids=lambda c: cli_faults.slug(c.name))
def test_bad_input_is_one_line(case, without_run):
    got = without_run[case.name]
    assert not cli_faults.problems(case, got), (cli_faults.problems(case, got), got["stderr"][-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("case", WITH_RUN, ids=lambda c: cli_faults.slug(c.name))
def test_bad_checkpoint_or_request_is_one_line(case, with_run):
    got = with_run[case.name]
    assert not cli_faults.problems(case, got), (cli_faults.problems(case, got), got["stderr"][-3000:])


def test_the_docs_table_lists_every_case():
    """docs/testing.md's table of faults is the case list, in order (its lines come from `cli_faults.py --table`)."""
    text = (REPO / "docs" / "testing.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \| `([^`]+)` \| (\d+) \| `(.*)` \|$", text, re.M)
    assert [(int(n), name.strip()) for n, name, *_ in rows] == [(i, c.name) for i, c in
                                                                enumerate(cli_faults.CASES, 1)]
    assert len(rows) >= 40
    for (_, _, _, code, line), c in zip(rows, cli_faults.CASES):
        assert int(code) == c.code and re.search(c.expect, line.replace("\\|", "|")), (c.name, line)


@pytest.mark.slow
def test_a_checkpoint_set_aside_is_never_the_newest_again(trained, tmp_path):
    """Newest step 4 broken; a rerun to step 3 resumes from step 2 and stops before step 4's number. The broken step
    was set aside when the rerun restored, so the run's newest checkpoint is now step 3 and loads without a word."""
    from dsv3_jax.train import checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained / "trained", run)
    cli_faults.break_step(run, 4)
    r = _train(["train.steps=3", f"train.run_dir={run}"], trained / "data", trained / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "set aside as 4.unrestorable-" in warnings[0], r.stderr
    assert checkpoint.existing_steps(run) == [2, 3] and len(list((run / "checkpoints").glob("4.unrestorable-*"))) == 1
    s = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(run), "--prompt", "de", "--max-new-tokens",
                        "3"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert s.returncode == 0 and "warning" not in s.stderr and "error" not in s.stderr, s.stderr
