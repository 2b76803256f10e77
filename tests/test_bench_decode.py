"""bench_decode: the quick path on the tiny config produces every row, ratios derived from the figures, and both
sides decode the same greedy tokens from the same weights."""

from __future__ import annotations

import dataclasses

import pytest

from dsv3_jax.infer import sampling
from dsv3_jax.presets import load_config
from dsv3_jax.tools import bench_decode

pytest.importorskip("transformers")


@pytest.mark.slow
def test_quick_rows_on_the_tiny_config(tmp_path):
    cfg = dataclasses.replace(load_config("tiny").model, initializer_range=0.1)
    rows = bench_decode.run(True, cfg=cfg, checkpoint=str(tmp_path / "absent"), new_tokens=6, batches=(1, 2),
                            attention_block_size=16)  # the 64-slot cache read in blocks (rows identical below)
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == [
        "greedy decode, batch 1, 6 new tokens", "greedy decode, batch 2, 6 new tokens", "cache bytes per token",
        "speculative mtp vs plain decode, batch 1, 6 new tokens (untrained bench model)"]
    for r in rows:
        assert r["ours"] > 0 and r["reference"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"])
    for b in (1, 2):
        assert by_name[f"greedy decode, batch {b}, 6 new tokens"]["rows_identical"] == f"{b}/{b}"
    cache = by_name["cache bytes per token"]
    assert cache["ours"] == sampling.cache_bytes_per_token(cfg) == (20 + 6) * 3 * 4
    # transformers 5 caches the latent as well (kv_lora + rope per layer; it expands K and V at every step)
    assert cache["reference"] == (20 + 6) * 3 * 4
    spec = rows[-1]
    assert spec["drafts"] > 0 and spec["acceptance"] == spec["accepted"] / spec["drafts"]


@pytest.mark.parametrize("argv, words", [(["--batches", "1,x"], "--batches"), (["--new-tokens", "0"], "positive"),
                                         (["--attention-block-size", "-4"], "--attention-block-size")])
def test_bad_arguments_exit_with_one_line(argv, words, capsys):
    assert bench_decode.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
