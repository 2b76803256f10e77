"""`python -m dsv3_jax.tools.bench`: every section present, ratios derived from the figures, bad input as one line."""

import json
import math
import subprocess
import sys

import pytest

from dsv3_jax.tools import bench


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.mark.slow
def test_quick_json_on_tiny_has_every_section_and_derived_ratios(capsys):
    assert bench.main(["--quick", "--json", "--config", "tiny"]) == 0
    out = json.loads(capsys.readouterr().out)
    sec = out["sections"]
    assert list(sec) == list(bench.SECTIONS) and out["config"] == "tiny" and out["quick"]
    for rows in sec.values():
        for r in rows:
            assert {"name", "ours", "reference", "ratio", "unit"} <= set(r), r
            assert r["ours"] > 0, r
    peak, *versus = sec["matmul"]
    assert peak["reference"] is None and peak["ours"] > 0
    cfg = bench.bench_config("tiny", [])
    m, tokens = cfg.model, cfg.train.global_batch_size * cfg.data.seq_len
    shapes = [(tokens, m.hidden_size, m.intermediate_size), (cfg.impl.moe_block_size, m.hidden_size,
                                                             m.moe_intermediate_size)]
    assert [r["name"].split()[2] for r in versus] == ["x".join(map(str, s)) for s in shapes]
    for r in versus:  # jnp.dot against torch.mm at the step's shapes: a rate, ratio = ours / torch
        assert r["reference"] > 0 and _close(r["ratio"], r["ours"] / r["reference"]), r
    rate, step, mfu = sec["train"]
    assert _close(rate["ratio"], rate["ours"] / rate["reference"])
    assert _close(step["ratio"], step["reference"] / step["ours"])  # a time: ratio = reference / ours
    assert _close(rate["ratio"], step["ratio"])  # the same step, as a rate and as a time
    assert 0 < mfu["ours"] < 100
    (layer,) = sec["moe"]
    assert _close(layer["ratio"], layer["ours"] / layer["reference"])  # MoE time over dense time
    ratios = [r for r in sec["decode"] if r["reference"] is not None and r["ratio"] is not None]
    assert ratios, sec["decode"]
    for r in ratios:
        assert _close(r["ratio"], r["ours"] / r["reference"]), r
    assert [r["name"] for r in sec["compile"]] == [f"train step compile, {n} layers" for n in bench.QUICK.depths]


@pytest.mark.parametrize("argv,needle", [(["--only", "train,bogus"], "unknown section(s) ['bogus']"),
                                         (["--config", "no_such_preset"], "no_such_preset")])
def test_bad_input_is_one_line(capsys, argv, needle):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err


def test_train_step_benchmark_derives_its_figures_from_the_timed_step(capsys):
    """benchmarks/train_step.py (the accelerator figures): tokens/s and both MFUs follow from the median step time,
    the model's FLOPs per token and the two peaks; bad config is one line."""
    import pathlib
    import runpy

    from dsv3_jax.presets import load_config
    from dsv3_jax.train.metrics import flops_per_token

    script = runpy.run_path(str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "train_step.py"))
    assert script["main"](["--config", "tiny", "--steps", "2", "--matmul", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    cfg = load_config("tiny")
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    assert res["tokens_per_step"] == tokens and res["step_s_min"] <= res["step_s_median"]
    assert _close(res["tokens_per_s"], tokens / res["step_s_median"])
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * res["tokens_per_s"]
    assert _close(res["model_tflops_per_s"], flops / 1e12)
    assert _close(res["mfu_vs_measured_matmul"], flops / (res["bf16_matmul_tflops_measured"] * 1e12))
    assert script["main"](["--config", "tiny", "model.hidden_sise=3"]) == 2
    assert "did you mean model.hidden_size" in capsys.readouterr().err


# A fresh interpreter in which torch, transformers and grain cannot be imported (the accelerator image has no grain;
# an install without the [bench] extra has no torch)
WITHOUT = "import sys\nfor m in ('torch', 'transformers', 'grain'):\n    sys.modules[m] = None\n"


def _run_without_extras(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT + code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)


def _check_rows(rows: list[dict]) -> None:
    for r in rows:
        assert "error" not in r, r
        if r.get("skipped"):
            continue
        assert r["ours"] > 0, r
        if r["reference"] is not None:
            want = r["reference"] / r["ours"] if r["unit"].startswith("ms") else r["ours"] / r["reference"]
            assert _close(r["ratio"], want), r


def test_without_torch_and_grain_the_benchmarks_run_and_skip_the_torch_parts_with_one_line(tmp_path):
    """Issue 25 item 8 and issue 23: `bench --quick --only matmul` and the accelerator suite run without torch,
    transformers and grain (as do the training loop's and checkpoints' imports); each part that needs torch is
    skipped with one line naming the extra."""
    out = tmp_path / "acc"
    r = _run_without_extras(
        "import dsv3_jax.train.loop, dsv3_jax.train.checkpoint  # grain only where grain batches are made\n"
        "from dsv3_jax.tools import bench\n"
        "assert bench.main(['--quick', '--only', 'matmul', '--config', 'tiny', '--json']) == 0\n"
        f"sys.exit(bench.main(['--suite', 'accelerator', '--tiny', '--out', {str(out)!r}, '--only', "
        "'peak,moe,attention,fp8,decode']))\n", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ModuleNotFoundError" not in r.stderr, r.stderr[-3000:]
    skips = [line for line in r.stderr.splitlines() if line.startswith("skipped")]
    assert skips == ["skipped (a) jnp.dot against torch.mm: torch and transformers not installed (the [bench] "
                     "extra: pip install -e '.[bench]' from a checkout)",
                     "skipped decode: torch and transformers not installed (the [bench] extra: pip install -e "
                     "'.[bench]' from a checkout)"], skips
    cpu = json.loads(r.stdout.split("\nAccelerator suite")[0].strip().splitlines()[0])
    assert [row["name"] for row in cpu["sections"]["matmul"]] == ["f32 matmul 1024^3"]
    res = json.loads((out / "accelerator.json").read_text())
    assert list(res["sections"]) == ["peak", "moe", "attention", "fp8"] and list(res["skipped"]) == ["decode"]
    for rows in res["sections"].values():
        _check_rows(rows)
    names = [row["name"] for row in res["sections"]["attention"]]
    assert names == [f"attention {b} {t}" for t in (64, 128, 256) for b in ("dense", "blocked", "cudnn")], names
    cudnn = [row for row in res["sections"]["attention"] if "cudnn" in row["name"]]
    assert all(row["skipped"] == "cudnn runs on gpu/cuda only" for row in cudnn)  # this is a CPU
    table = (out / "accelerator.md").read_text()
    assert all(f"| {row['name']} |" in table for rows in res["sections"].values() for row in rows)
    assert "skipped decode: torch and transformers not installed" in table


def test_accelerator_suite_arguments(capsys):
    assert bench.main(["--suite", "accelerator"]) == 2
    assert capsys.readouterr().err.strip() == "error: --suite accelerator needs --out DIR"
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "torch and transformers (the [bench] extra) run the reference columns" in " ".join(
        capsys.readouterr().out.split())


@pytest.mark.slow
def test_accelerator_suite_on_tiny_measures_every_section_against_its_reference(tmp_path, capsys):
    from dsv3_jax.tools import bench_accelerator as acc

    assert bench.main(["--suite", "accelerator", "--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "accelerator.json").read_text())
    assert list(res["sections"]) == list(acc.SECTIONS) and res["tiny"] and not res["skipped"]
    for rows in res["sections"].values():
        _check_rows(rows)
    peak = res["sections"]["peak"][0]["ours"]
    bf16, fp8 = res["sections"]["train"]
    assert (bf16["precision"], fp8["precision"]) == ("bf16", "fp8") and bf16["reference"] is None
    assert _close(fp8["ratio"], fp8["ours"] / bf16["ours"])  # fp8 against the bf16 step of the same run
    for r in (bf16, fp8):
        assert _close(r["ours"], r["tokens_per_step"] / r["step_s"])
        assert _close(r["mfu_pct"], 100 * r["model_tflops"] / peak)
        assert r["moe_backend"] == "blocked" and r["attention_backend"] in ("dense", "blocked")  # `auto` on CPU
    assert "target" in bf16 and "target" in fp8  # issue 23's targets are judged on the rows they name
    decode = {r["name"]: r for r in res["sections"]["decode"]}
    assert [f"greedy decode, batch {b}, 4 new tokens" in decode for b in (1, 2)] == [True, True]
    assert decode["greedy decode, batch 1, 4 new tokens"]["met"] in (True, False)
    assert capsys.readouterr().out == (tmp_path / "accelerator.md").read_text() + "\n"
