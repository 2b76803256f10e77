"""The byte-level BPE trainer: its tokenizer.json round-trips any text, compresses, and data.tokenizer= accepts it."""

import json

import numpy as np
import pytest

from dsv3_jax.config import DataConfig
from dsv3_jax.data import pipeline, tokenizer
from dsv3_jax.errors import DataError
from dsv3_jax.tools import tokenizer as tokenizer_cli

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    lines = [json.dumps({"text": f"def function_{i}(value):\n    return value * {i} + total_{i % 5}  # café {i}\n"})
             for i in range(300)]
    (root / "code.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "tok" / "tokenizer.json"
    argv = ["train", "--source", str(root / "*.jsonl"), "--vocab-size", "400", "--out", str(out)]
    assert tokenizer_cli.main(argv) == 0
    return root, str(out)


def test_round_trip_and_compression(trained):
    root, path = trained
    tok = tokenizer.make_tokenizer(path)
    assert tok.vocab_size == 400 and (tok.bos_id, tok.eos_id) == (0, 1)
    for text in ("def function_7(value):\n    return value", "unseen: héllo 世界 \t\x00 ✓"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text and max(ids) < tok.vocab_size and min(ids) > 1  # specials never from text
    sample = "def function_12(value):\n    return value * 12 + total_2\n"
    assert len(sample.encode()) / len(tok.encode(sample)) > 2.5  # merges learned from the corpus


def test_accepted_by_data_tokenizer_and_bytes_per_token_is_exact(trained, tmp_path):
    root, path = trained
    cfg = DataConfig(source=str(root / "*.jsonl"), tokenizer=path, seq_len=32, eval_fraction=0.1,
                     cache_dir=str(tmp_path / "cache"))
    batch = next(pipeline.make_dataset(cfg, "train", 4, vocab_size=400))
    assert batch["tokens"].shape == (4, 33) and batch["tokens"].max() < 400
    tok = tokenizer.make_tokenizer(path)
    docs = pipeline.read_documents(cfg)
    held = pipeline.eval_mask([k for k, _ in docs], cfg.eval_fraction)
    texts = [t for (_, t), e in zip(docs, held) if e]
    info = pipeline.split_info(cfg, "eval")
    predicted = sum(len(tok.encode(t)) + 1 for t in texts)  # each document's tokens and its eos; never the bos
    assert info.bytes == sum(len(t.encode("utf-8")) for t in texts) and info.target_tokens == predicted
    assert info.bytes_per_token == pytest.approx(info.bytes / predicted) and info.bytes_per_token > 2.5
    byte_info = pipeline.split_info(DataConfig(source=cfg.source, seq_len=32, eval_fraction=0.1,
                                               cache_dir=cfg.cache_dir), "eval")
    assert byte_info.bytes == info.bytes and byte_info.bytes_per_token == pytest.approx(
        info.bytes / (info.bytes + info.documents))
    with pytest.raises(DataError, match=r"token id \d+ .* is >= model vocab_size 300"):
        pipeline.make_dataset(cfg, "train", 4, vocab_size=300)
    np.testing.assert_array_equal(batch["segment_ids"][:, 0], 1)


def test_too_small_vocabulary_is_one_line(trained, tmp_path):
    root, _ = trained
    with pytest.raises(DataError, match=r"--vocab-size must be at least 258") as info:
        tokenizer.train_bpe(str(root / "*.jsonl"), 100, str(tmp_path / "t.json"))
    assert "\n" not in str(info.value) and not (tmp_path / "t.json").exists()
