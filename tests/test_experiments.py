"""`python -m dsv3_jax.tools.experiments` end to end on `tiny` (seconds of steps): the table comes from metrics.jsonl,
plots are written, and bad input (mismatched runs, a run dir without metrics, unknown experiment) is one line."""

import json
import re
import shutil

import numpy as np
import pytest

from dsv3_jax.tools import eval as evaluation
from dsv3_jax.tools import experiments, plot

QUICK = ["train.steps=4", "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=2"]


@pytest.fixture(scope="module")
def mtp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp")
    assert experiments.main(["mtp", "--quick", "--preset", "tiny", "--seeds", "2", "--eval-batches", "1",
                             "--out", str(out), *QUICK]) == 0
    return out


def _cell(table: str, arm: str, column: str) -> str:
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:] if ln.startswith(f"| {arm} |"))
    return row[head.index(column)]


@pytest.mark.slow
def test_table_cell_is_recomputed_from_the_runs_metrics(mtp_out):
    table = (mtp_out / "table.md").read_text()
    for arm, column, key in (("mtp_depth_1", "held-out bits/byte", "bits_per_byte"),
                             ("mtp_depth_1", "MTP head accuracy (token t+2)", "mtp1_accuracy"),
                             ("mtp_depth_0", "held-out loss (nats/token)", "loss")):
        values = []
        for seed in (0, 1):
            records = [json.loads(ln) for ln in (mtp_out / "arm_runs" / f"{arm}__s{seed}" / "metrics.jsonl").open()]
            values.append(next(r[key] for r in records if r["kind"] == "heldout"))
        mean, spread = (float(x) for x in re.fullmatch(r"(\S+) ± (\S+)", _cell(table, arm, column)).groups())
        digits = 4 if key != "mtp1_accuracy" else 3
        assert mean == pytest.approx(round(np.mean(values), digits), abs=10 ** -digits)
        assert spread == pytest.approx(round(np.std(values, ddof=1), digits), abs=10 ** -digits)
    assert _cell(table, "mtp_depth_0", "speculative acceptance (greedy)") == "-"  # no MTP head, no drafts
    acc = _cell(table, "mtp_depth_1", "speculative acceptance (greedy)")
    assert 0 <= float(acc.split(" ")[0]) <= 1
    for name in ("loss.png", "maxvio.png", "load_mtp_depth_1__s0.png", "bias_mtp_depth_0__s1.png"):
        assert (mtp_out / "plots" / name).stat().st_size > 1000, name


@pytest.mark.slow
def test_heldout_record_equals_the_eval_cli(mtp_out, capsys):
    run = mtp_out / "arm_runs" / "mtp_depth_1__s0"
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").open()]
    held = next(r for r in records if r["kind"] == "heldout")
    capsys.readouterr()
    assert evaluation.main(["--checkpoint", str(run), "--batches", "1", "--batch-size", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("loss", "bits_per_byte", "mtp1_accuracy", "maxvio_global/0"):
        assert res[key] == pytest.approx(held[key], rel=1e-5)


@pytest.mark.slow
def test_mismatched_runs_are_one_line(mtp_out, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(mtp_out / "arm_runs", copy / "arm_runs", ignore=shutil.ignore_patterns("checkpoints"))
    cfg_path = copy / "arm_runs" / "mtp_depth_1__s1" / "run_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["train"]["learning_rate"] *= 2
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert experiments.main(["mtp", "--preset", "tiny", "--out", str(copy), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mismatched runs") and "train.learning_rate" in err and "\n" not in err


def test_bad_input_is_one_line(tmp_path, capsys):
    assert experiments.main(["balanse", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown experiment 'balanse'; choose one of ['balance', 'mtp']"
    (tmp_path / "run").mkdir()
    assert plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "has no metrics.jsonl" in err and "\n" not in err
