"""bench_decode: the quick path on the tiny config produces every row, ratios derived from the figures, and both
sides decode the same greedy tokens from the same weights."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from dsv3_jax.infer import sampling
from dsv3_jax.presets import load_config
from dsv3_jax.tools import bench_decode

pytest.importorskip("transformers")


@pytest.mark.slow
def test_quick_rows_on_the_tiny_config(tmp_path):
    cfg = dataclasses.replace(load_config("tiny").model, initializer_range=0.1)
    rows = bench_decode.run(True, cfg=cfg, checkpoint=str(tmp_path / "absent"), new_tokens=6, batches=(1, 2),
                            attention_block_size=16,  # the 64-slot cache read in blocks (rows identical below)
                            spec_batches=(1, 2))
    by_name = {r["name"]: r for r in rows}
    bound_name = ("speculative mtp, batch 1: ceiling = (1 + acceptance) x plain step bytes / (verify + draft "
                  "bytes)")
    assert [r["name"] for r in rows] == [
        "greedy decode, batch 1, 6 new tokens", "greedy decode, batch 2, 6 new tokens", "cache bytes per token",
        "speculative mtp vs plain decode, batch 1, 6 new tokens (untrained bench model)", bound_name,
        "speculative mtp vs plain decode, batch 2, 6 new tokens (untrained bench model)"]
    for r in rows:
        if r["name"] != bound_name:
            assert r["ours"] > 0 and r["reference"] > 0
            assert r["ratio"] == pytest.approx(r["ours"] / r["reference"])
    for b in (1, 2):
        assert by_name[f"greedy decode, batch {b}, 6 new tokens"]["rows_identical"] == f"{b}/{b}"
    cache = by_name["cache bytes per token"]
    assert cache["ours"] == sampling.cache_bytes_per_token(cfg) == (20 + 6) * 3 * 4
    # transformers 5 caches the latent as well (kv_lora + rope per layer; it expands K and V at every step)
    assert cache["reference"] == (20 + 6) * 3 * 4
    for spec in (rows[3], rows[5]):
        assert spec["drafts"] > 0 and spec["acceptance"] == spec["accepted"] / spec["drafts"]
        assert spec["rows_identical"] == "1/1" if spec is rows[3] else "2/2"  # greedy speculative == plain greedy
        f_spec, f_plain = spec["forwards"]
        assert f_plain == 6 and f_spec <= 6  # 6 tokens a row: the prefill's and 5 decode steps, fewer speculating
        assert spec["step_cost"] == pytest.approx(spec["ratio"] ** -1 * f_plain / f_spec)
    assert by_name[bound_name]["acceptance"] == rows[3]["acceptance"]
    assert "acceptance" in bench_decode.format_rows(rows)


def test_bytes_bound_counts_the_weights_each_step_reads():
    """Plain: all main weights but the embedding, K/E of the routed experts; verify: 2K/E of them; draft: the MTP
    module with K/E of its experts, plus the head. Checked against sums over the tiny model's named arrays."""
    from flax import nnx

    from dsv3_jax.model.transformer import create

    cfg = load_config("tiny").model  # E = 8, K = 2
    model = create(cfg, seed=0)
    st = nnx.state(model, nnx.Param)
    size = lambda tree: sum(a.size * 4 for a in jax.tree.leaves(tree))  # noqa: E731 (float32)
    routed = sum(size(st["moe_layers"]["mlp"][w]) for w in ("w_gate", "w_up", "w_down"))
    mtp_routed = sum(size(st["mtp"][0]["block"]["mlp"][w]) for w in ("w_gate", "w_up", "w_down"))
    whole = size(st) - size(st["embed"]) - size(st["mtp"])
    plain, verify = whole - routed * 6 / 8, whole - routed * 4 / 8
    draft = size(st["mtp"]) - mtp_routed * 6 / 8 + size(st["head"])
    r = bench_decode.spec_bytes_bound(model, 0.5)
    assert r["plain_mb"] * 1e6 == pytest.approx(plain) and r["verify_mb"] * 1e6 == pytest.approx(verify)
    assert r["draft_mb"] * 1e6 == pytest.approx(draft)
    assert r["ours"] == pytest.approx(1.5 * plain / (verify + draft))


@pytest.mark.parametrize("argv, words", [(["--batches", "1,x"], "--batches"), (["--new-tokens", "0"], "positive"),
                                         (["--attention-block-size", "-4"], "--attention-block-size"),
                                         (["--spec-batches", "16,0"], "--spec-batches"),
                                         (["--spec-batches", "1,y"], "--spec-batches")])
def test_bad_arguments_exit_with_one_line(argv, words, capsys):
    assert bench_decode.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
