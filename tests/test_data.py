"""The input pipeline: tokenizers, sources, split, packing, grain order/sharding/state, and its one-line errors."""

import json
import re

import grain
import numpy as np
import pytest

from dsv3_jax.config import DataConfig
from dsv3_jax.data import pipeline
from dsv3_jax.data.pipeline import make_dataset, pack_documents
from dsv3_jax.data.tokenizer import make_tokenizer
from dsv3_jax.errors import DataError

BYTE = make_tokenizer("byte")


def marked_corpus(tmp_path, n_docs=24, reps=6):
    """Text files whose every fragment names its document and is unique: `<d007.0><d007.1>...`."""
    for i in range(n_docs):
        (tmp_path / f"doc{i:03d}.txt").write_text("".join(f"<d{i:03d}.{j}>" for j in range(reps + i % 5)))
    return DataConfig(source=str(tmp_path / "*.txt"), seq_len=24, eval_fraction=0.25)


def markers(batch) -> set[str]:
    return {m for row in batch["tokens"] for m in re.findall(r"<d(\d{3})\.\d+>", BYTE.decode(row))}


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def row_keys(batches):
    return [row.tobytes() for b in batches for row in b["tokens"]]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers.


def test_byte_tokenizer():
    text = "héllo, 世界\n"
    ids = BYTE.encode(text)
    assert ids == [b + 2 for b in text.encode("utf-8")]
    assert (BYTE.vocab_size, BYTE.bos_id, BYTE.eos_id) == (258, 0, 1)
    assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id]) == text
    assert BYTE.decode([0xFF + 2, ord("a") + 2]) == "\ufffda"  # invalid UTF-8 is replaced, not raised


def _word_tokenizer(path, specials=("<s>", "</s>")):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", *specials, "def", "return", "x", "(", ")", ":"] + [f"w{i}" for i in range(300)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(list(specials))
    tok.save(str(path))
    return words


def test_tokenizer_json(tmp_path):
    words = _word_tokenizer(tmp_path / "tokenizer.json")
    tok = make_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (words.index("<s>"), words.index("</s>"), len(words))
    ids = tok.encode("def x ( ) : return w299")
    assert ids == [words.index(w) for w in ["def", "x", "(", ")", ":", "return", "w299"]]
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]).split() == ["def", "x", "(", ")", ":", "return", "w299"]

    # The pipeline with it: documents packed as [bos] + ids + [eos]; ids beyond the model vocabulary are rejected.
    texts = [" ".join(f"w{(37 * i + 7 * j) % 300}" for j in range(40)) for i in range(6)]
    for i, t in enumerate(texts):
        (tmp_path / f"c{i}.txt").write_text(t)
    cfg = DataConfig(source=str(tmp_path / "c*.txt"), tokenizer=str(tmp_path / "tokenizer.json"), seq_len=16,
                     eval_fraction=0.99)
    batches = list(make_dataset(cfg, "eval", 1, vocab_size=len(words)))
    stream = np.concatenate([batches[0]["tokens"][0]] + [b["tokens"][0][1:] for b in batches[1:]])
    stream = stream[: len(stream) - int((batches[-1]["segment_ids"][0] == 0).sum())]
    held_out = pipeline.eval_mask([f"c{i}.txt" for i in range(6)], 0.99)
    expected = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t, e in zip(texts, held_out) if e]
    assert stream.tolist() == [i for doc in expected for i in doc]
    with pytest.raises(DataError, match=r"token id \d+ .* vocab_size 258$"):
        make_dataset(cfg, "train", 4, vocab_size=258)


def test_tokenizer_json_specials_from_config_and_fallback(tmp_path):
    (tmp_path / "a").mkdir()
    words = _word_tokenizer(tmp_path / "a" / "tokenizer.json", specials=("<go>", "<stop>"))
    (tmp_path / "a" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<go>", "eos_token": {"content": "<stop>"}}))
    tok = make_tokenizer(str(tmp_path / "a"))
    assert (tok.bos_id, tok.eos_id) == (words.index("<go>"), words.index("<stop>"))

    (tmp_path / "b").mkdir()
    words = _word_tokenizer(tmp_path / "b" / "tokenizer.json", specials=("<|endoftext|>",))
    tok = make_tokenizer(str(tmp_path / "b" / "tokenizer.json"))
    assert tok.bos_id == tok.eos_id == words.index("<|endoftext|>")

    (tmp_path / "c").mkdir()
    _word_tokenizer(tmp_path / "c" / "tokenizer.json", specials=("<pad>",))
    with pytest.raises(DataError, match="has no eos token"):
        make_tokenizer(str(tmp_path / "c" / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------------------------
# Packing.


def test_packing_segments_positions_padding():
    rng = np.random.default_rng(0)
    lengths = [3, 30, 1, 9, 0, 14, 5]  # 30 > seq_len: split across rows; the last row is part padding
    docs = [rng.integers(100 * (d + 1), 100 * (d + 1) + 50, n).astype(np.int32) for d, n in enumerate(lengths)]
    seq_len = 8
    packed = pack_documents(docs, bos_id=0, eos_id=1, seq_len=seq_len)
    full = [np.concatenate([[0], d, [1]]) for d in docs]
    stream = np.concatenate(full)
    np.testing.assert_array_equal(packed.stream, stream)
    rows = [packed[r] for r in range(len(packed))]
    assert len(rows) == -(-(len(stream) - 1) // seq_len)
    assert (rows[-1]["segment_ids"] == 0).any()

    targets = 0
    for r, row in enumerate(rows):
        tok, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
        assert tok.shape == seg.shape == pos.shape == (seq_len + 1,) and tok.dtype == np.int32
        real = seg > 0
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # padding only at the end
        assert n == seq_len + 1 or r == len(rows) - 1  # ... and only in the last row
        assert (tok[n:] == 0).all() and (pos[n:] == 0).all()
        np.testing.assert_array_equal(tok[:n], stream[r * seq_len: r * seq_len + n])  # rows overlap by one token
        assert seg[0] == 1 and set(np.diff(seg[:n])) <= {0, 1}
        for s in range(1, seg.max() + 1):
            m = seg == s
            np.testing.assert_array_equal(pos[m], np.arange(m.sum()))  # positions restart per segment
            body = tok[m][(tok[m] != 0) & (tok[m] != 1)]
            assert len(set(body // 100)) <= 1  # no segment mixes two documents
            doc = [d for d, f in enumerate(full) if len(body) and body[0] // 100 == d + 1]
            if doc:  # the segment is a contiguous piece of that document
                f, piece = full[doc[0]], tok[m]
                assert any(np.array_equal(f[i:i + len(piece)], piece) for i in range(len(f) - len(piece) + 1))
        targets += int(((seg[1:] == seg[:-1]) & (seg[1:] > 0)).sum())
    assert targets == len(stream) - len(docs)  # every token but the bos tokens is predicted exactly once

    # Rows past the natural count are pure padding (used to fill the last eval batch).
    pad = packed.padded_to(len(rows) + 2)[len(rows) + 1]
    assert len(packed.padded_to(len(rows) + 2)) == len(rows) + 2
    assert not pad["segment_ids"].any() and not pad["tokens"].any()


def test_stdlib_source_first_batch():
    cfg = DataConfig(seq_len=64, max_documents=40)
    batch = next(make_dataset(cfg, "train", 4, vocab_size=258))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((4, 65), np.dtype(np.int32)) for k in ("tokens", "segment_ids", "positions")}
    docs = pipeline.read_documents(cfg)
    assert len(docs) == 40 and all(k.startswith("stdlib/") and k.endswith(".py") for k, _ in docs)
    assert docs == pipeline.read_documents(cfg) and len({k for k, _ in docs}) == 40  # deterministic order
    assert not any("/test/" in k or "site-packages" in k for k, _ in docs)
    texts = {t for _, t in docs}
    row = batch["tokens"][0][batch["segment_ids"][0] == 1]
    piece = (row[row >= 2] - 2).astype(np.uint8).tobytes()  # bytes, as a row may cut a multi-byte character
    assert len(piece) > 8 and any(piece in t.encode() for t in texts)
    train, ev = pipeline.split_info(cfg, "train"), pipeline.split_info(cfg, "eval")
    assert train.documents + ev.documents == 40 and ev.documents >= 1
    assert train.bytes == sum(len(t.encode()) for t in texts) - ev.bytes
    assert ev.target_tokens == ev.bytes + ev.documents  # byte tokenizer: one token per byte plus one eos
    assert 0.9 < ev.bytes_per_token < 1.0


# ---------------------------------------------------------------------------------------------------------------
# Order: determinism, epochs, split, sharding, state.


def test_determinism_and_epoch_reshuffle(tmp_path):
    cfg = marked_corpus(tmp_path)
    a, b = take(make_dataset(cfg, "train", 2, seed=1), 6), take(make_dataset(cfg, "train", 2, seed=1), 6)
    assert_batches_equal(a, b)
    other = take(make_dataset(cfg, "train", 2, seed=2), 6)
    assert row_keys(other) != row_keys(a)
    reseeded = take(make_dataset(DataConfig(**{**cfg.__dict__, "shuffle_seed": 5}), "train", 2, seed=1), 6)
    assert row_keys(reseeded) != row_keys(a)

    n = pipeline.split_info(cfg, "train").rows
    epochs = row_keys(take(make_dataset(cfg, "train", 1), 2 * n))
    assert sorted(epochs[:n]) == sorted(epochs[n:])  # each epoch is a permutation of all rows ...
    assert len(set(epochs[:n])) == n
    assert epochs[:n] != epochs[n:]  # ... in a different order


def test_train_eval_disjoint(tmp_path):
    cfg = marked_corpus(tmp_path)
    train = take(make_dataset(cfg, "train", 2), pipeline.split_info(cfg, "train").rows)
    ev = list(make_dataset(cfg, "eval", 2))
    train_docs = set().union(*map(markers, train))
    eval_docs = set().union(*map(markers, ev))
    assert train_docs and eval_docs and not train_docs & eval_docs
    assert train_docs | eval_docs == {f"{i:03d}" for i in range(24)}
    keys = [k for k, _ in pipeline.read_documents(cfg)]
    np.testing.assert_array_equal(pipeline.eval_mask(keys, 0.25), pipeline.eval_mask(keys, 0.25))
    assert pipeline.eval_mask(keys, 0.0).sum() == 0 and 0 < pipeline.eval_mask(keys[:2], 0.999).sum() < 2


def test_eval_is_finite_deterministic_and_padded(tmp_path):
    cfg = marked_corpus(tmp_path)
    info = pipeline.split_info(cfg, "eval")
    a, b = list(make_dataset(cfg, "eval", 4)), list(make_dataset(cfg, "eval", 4))
    assert_batches_equal(a, b)
    assert len(a) == -(-info.rows // 4)
    real_rows = sum(int((x["segment_ids"].max(axis=1) > 0).sum()) for x in a)
    assert real_rows == info.rows


@pytest.mark.parametrize("split", ["train", "eval"])
def test_sharding(tmp_path, split):
    cfg = marked_corpus(tmp_path, n_docs=40)
    n_batches = 6 if split == "train" else None
    whole = make_dataset(cfg, split, 4)
    parts = [make_dataset(cfg, split, 4, shard_index=i, shard_count=2) for i in range(2)]
    whole = take(whole, n_batches) if n_batches else list(whole)
    parts = [take(p, n_batches) if n_batches else list(p) for p in parts]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for k, g in enumerate(whole):
        assert parts[0][k]["tokens"].shape == (2, 25)
        for key in g:  # process i holds block i of the global batch
            np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), g[key])
    if split == "train":
        assert not set(row_keys(parts[0])) & set(row_keys(parts[1]))  # within one epoch rows are unique


def test_iterator_state_restore(tmp_path):
    cfg = marked_corpus(tmp_path)
    n = pipeline.split_info(cfg, "train").rows
    it = make_dataset(cfg, "train", 2, shard_index=1, shard_count=2, seed=3)
    take(it, n // 2 - 1)  # each step consumes 2 global rows: the next batches cross the epoch boundary
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)
    restored = make_dataset(cfg, "train", 2, shard_index=1, shard_count=2, seed=3)
    restored.set_state(state)
    assert_batches_equal(take(restored, 4), expected)


def test_iterator_orbax_handler(tmp_path):
    from etils import epath

    cfg = marked_corpus(tmp_path)
    it = make_dataset(cfg, "train", 2)
    take(it, 3)
    (tmp_path / "ckpt").mkdir()
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path / "ckpt"), args=grain.checkpoint.CheckpointSave(it))
    expected = take(it, 3)
    restored = grain.checkpoint.CheckpointHandler().restore(
        epath.Path(tmp_path / "ckpt"), args=grain.checkpoint.CheckpointRestore(make_dataset(cfg, "train", 2)))
    assert_batches_equal(take(restored, 3), expected)


# ---------------------------------------------------------------------------------------------------------------
# File formats.

TEXTS = ["first document\nwith two lines", "second: ünïcode ✓", "third"]


def test_text_jsonl_parquet_arrayrecord(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    for i, t in enumerate(TEXTS):
        (tmp_path / f"t{i}.txt").write_text(t)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n\n")
    pq.write_table(pa.table({"body": TEXTS, "n": [1, 2, 3]}), str(tmp_path / "d.parquet"))
    w = ArrayRecordWriter(str(tmp_path / "plain.array_record"), "group_size:1")
    for t in TEXTS:
        w.write(t.encode())
    w.close()
    w = ArrayRecordWriter(str(tmp_path / "json.array_record"), "group_size:1")
    for t in TEXTS:
        w.write(json.dumps({"body": t}).encode())
    w.close()
    (tmp_path / "notes.data").write_text(json.dumps({"body": "as jsonl"}) + "\n")

    def docs(glob, fmt="auto"):
        return pipeline.read_documents(DataConfig(source=str(tmp_path / glob), format=fmt, text_field="body"))

    assert docs("t*.txt") == [(f"t{i}.txt", t) for i, t in enumerate(TEXTS)]
    assert docs("*.jsonl") == [(f"d.jsonl#{i + 1}", t) for i, t in enumerate(TEXTS)]
    assert docs("*.parquet") == [(f"d.parquet#{i}", t) for i, t in enumerate(TEXTS)]
    assert [t for _, t in docs("plain.array_record")] == TEXTS
    assert [t for _, t in docs("json.array_record")] == TEXTS
    assert docs("notes.data") == [("notes.data", (tmp_path / "notes.data").read_text())]  # auto: unknown -> text
    assert docs("notes.data", "jsonl") == [("notes.data#1", "as jsonl")]
    assert len(docs("*")) == 3 + 3 + 3 + 3 + 3 + 1
    assert docs("d.jsonl", "text") == [("d.jsonl", (tmp_path / "d.jsonl").read_text())]  # format beats the suffix
    with pytest.raises(DataError, match=r"d\.parquet: binary data"):  # read as text, a binary file is refused
        docs("*", "text")
    assert [t for _, t in docs("*.jsonl")] == [t for _, t in docs("*.parquet")]

    # End to end: the packed rows of a one-file corpus decode back to its documents.
    cfg = DataConfig(source=str(tmp_path / "d.parquet"), text_field="body", seq_len=200, eval_fraction=0.0)
    row = next(make_dataset(cfg, "train", 1))
    seg, tok = row["segment_ids"][0], row["tokens"][0]
    assert [BYTE.decode(tok[seg == s]) for s in range(1, seg.max() + 1)] == TEXTS


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line each, naming what is wrong.


def _errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    pq.write_table(pa.table({"content": ["x"]}), str(tmp_path / "a.parquet"))
    (tmp_path / "one.txt").write_text("just one document")
    d = str(tmp_path)
    return [
        (DataConfig(source=d + "/nothing/*.txt"), {}, r"data\.source '.*nothing/\*\.txt' matched no files"),
        (DataConfig(source=d + "/a.jsonl"), {}, r"a\.jsonl:1: no field 'text' \(data\.text_field\)"),
        (DataConfig(source=d + "/bad.jsonl"), {}, r"bad\.jsonl:1: invalid JSON"),
        (DataConfig(source=d + "/a.parquet"), {}, r"a\.parquet: no column 'text' \(data\.text_field\)"),
        (DataConfig(source=d + "/one.txt", format="csv"), {}, r"data\.format must be one of"),
        (DataConfig(source=d + "/one.txt", tokenizer=d + "/missing.json"), {}, r"data\.tokenizer: .*missing\.json"),
        (DataConfig(source=d + "/one.txt", eval_fraction=1.5), {}, r"data\.eval_fraction must be in \[0, 1\)"),
        (DataConfig(source=d + "/one.txt", max_documents=0), {}, r"data\.max_documents must be positive"),
        (DataConfig(source=d + "/one.txt"), {"split": "eval"}, r"the eval split .* is empty"),
        (DataConfig(source=d + "/one.txt"), {"split": "test"}, r"split must be 'train' or 'eval'"),
        (DataConfig(source=d + "/one.txt"), {"batch_size": 6, "shard_count": 4},
         r"global_batch_size 6 is not divisible by the process count 4"),
        (DataConfig(source=d + "/one.txt"), {"shard_index": 2, "shard_count": 2}, r"shard_index 2 is out of range"),
        (DataConfig(source=d + "/one.txt"), {"vocab_size": 100}, r"token id 1\d\d .*is >= model vocab_size 100"),
    ]


def test_errors(tmp_path):
    for cfg, kwargs, pattern in _errors(tmp_path):
        kw = {"split": "train", "batch_size": 2, **kwargs}
        with pytest.raises(DataError, match=pattern) as info:
            make_dataset(cfg, **kw)
        assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
