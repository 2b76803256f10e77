"""`python -m dsv3_jax.tools.bench`: every section present, ratios derived from the figures, bad input as one line."""

import json
import math

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
