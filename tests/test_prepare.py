"""The prepare step and the shard reader: same rows as the in-memory packing, resumable, refuses bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from dsv3_jax.config import DataConfig
from dsv3_jax.data import pipeline, prepare, sources
from dsv3_jax.data.pipeline import make_dataset, pack_documents
from dsv3_jax.data.tokenizer import make_tokenizer
from dsv3_jax.errors import DataError
from dsv3_jax.tools import prepare as prepare_cli

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_SHARDS = 0.0005  # MB: about 500 bytes of text per shard, so rows cross many shard boundaries


def jsonl_corpus(root: pathlib.Path, files=3, docs=40) -> str:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in range(files):
        lines = []
        for d in range(docs):
            words = " ".join(f"w{f}.{d}.{j}" for j in range(int(rng.integers(1, 30))))
            lines.append(json.dumps({"id": d, "text": words}))
            if d % 7 == 3:
                lines.append("")  # blank lines are skipped but still counted in the line numbers
        (root / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "*.jsonl")


def reference_rows(cfg: DataConfig, split: str):
    """The rows built in memory, the old way: every document read, split by eval_mask, packed."""
    docs = pipeline.read_documents(cfg)
    is_eval = pipeline.eval_mask([k for k, _ in docs], cfg.eval_fraction)
    tok = make_tokenizer(cfg.tokenizer)
    texts = [t for (_, t), e in zip(docs, is_eval) if e == (split == "eval")]
    return pack_documents([tok.encode_array(t) for t in texts], tok.bos_id, tok.eos_id, cfg.seq_len), texts


def assert_rows_equal(rows, ref):
    assert len(rows) == len(ref)
    for r in range(len(ref)):
        a, b = rows[r], ref[r]
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"row {r} {k}")


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in y:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture
def corpus(tmp_path):
    glob = jsonl_corpus(tmp_path / "src")
    out = tmp_path / "prepared"
    prepare.prepare(glob, "byte", out, eval_fraction=0.2, shard_mb=TINY_SHARDS)
    raw = DataConfig(source=glob, seq_len=16, eval_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    return raw, DataConfig(source=str(out), seq_len=16, eval_fraction=0.2), out


def test_prepared_rows_equal_in_memory_packing(corpus):
    raw, prepared, out = corpus
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) > 10
    for split in ("train", "eval"):
        ref, texts = reference_rows(raw, split)
        rows, _ = pipeline._split(prepared, split)
        assert_rows_equal(rows, ref)
        info = pipeline.split_info(prepared, split)
        assert info.documents == len(texts) and info.bytes == sum(len(t.encode()) for t in texts)
        assert info.target_tokens == len(ref.stream) - len(texts) and info.rows == ref.num_rows


def test_prepared_and_raw_glob_yield_identical_batches(corpus):
    raw, prepared, _ = corpus
    for split, n in (("train", 30), ("eval", 2)):
        assert_batches_equal(take(make_dataset(prepared, split, 4, seed=3), n),
                             take(make_dataset(raw, split, 4, seed=3), n))


def test_two_processes_together_yield_the_single_process_batches(corpus):
    _, prepared, _ = corpus
    one = take(make_dataset(prepared, "train", 4, seed=1), 25)
    halves = [take(make_dataset(prepared, "train", 4, i, 2, seed=1), 25) for i in range(2)]
    for b, h0, h1 in zip(one, *halves):
        for k in b:
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), b[k])


_KILLED = """
import json, os, signal, sys
from dsv3_jax.config import DataConfig
from dsv3_jax.data.pipeline import make_dataset
it = make_dataset(DataConfig(source=sys.argv[1], seq_len=16, eval_fraction=0.2), "train", 4, seed=7)
for i in range(10**6):
    batch = next(it)
    print(json.dumps({"state": it.get_state(), "tokens": batch["tokens"].tolist()}), flush=True)
    if i == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_sigkill_mid_epoch_is_bit_identical(corpus):
    _, prepared, _ = corpus
    epoch = pipeline.split_info(prepared, "train").rows // 4
    kill_at = epoch // 2
    proc = subprocess.run([sys.executable, "-c", _KILLED, prepared.source, str(kill_at)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == kill_at + 1
    reference = take(make_dataset(prepared, "train", 4, seed=7), kill_at + 1 + epoch)
    assert [r["tokens"] for r in lines] == [b["tokens"].tolist() for b in reference[:kill_at + 1]]
    resumed = make_dataset(prepared, "train", 4, seed=7)
    resumed.set_state(lines[-1]["state"])
    assert_batches_equal(take(resumed, epoch), reference[kill_at + 1:])


def test_prepare_resumes_keeping_finished_shards(tmp_path, monkeypatch):
    glob = jsonl_corpus(tmp_path / "src")
    fresh = prepare.prepare(glob, "byte", tmp_path / "fresh", shard_mb=TINY_SHARDS)
    real, calls = prepare.make_shard, []

    def interrupted(out, index, *args):
        calls.append(index)
        if index == 5:
            raise KeyboardInterrupt
        return real(out, index, *args)

    out = tmp_path / "out"
    monkeypatch.setattr(prepare, "make_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(glob, "byte", out, shard_mb=TINY_SHARDS)
    assert not (out / "manifest.json").exists() and (out / "shards" / "00004.json").exists()
    (out / "shards" / "00005.train.tokens.npy").write_bytes(b"half-written")  # no json: unfinished, redone
    (out / "shards" / "00002.json").unlink()  # its files are there, but without the json it is unfinished
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("0000[0134].*")}
    calls.clear()
    monkeypatch.setattr(prepare, "make_shard", lambda out, index, *a: calls.append(index) or real(out, index, *a))
    resumed = prepare.prepare(glob, "byte", out, shard_mb=TINY_SHARDS)
    assert calls[:2] == [2, 5] and 0 not in calls and 4 not in calls
    assert kept == {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("0000[0134].*")}
    assert resumed["splits"] == fresh["splits"]
    cfg = DataConfig(source=str(out), seq_len=16)
    assert_rows_equal(pipeline._split(cfg, "train")[0], pipeline._split(DataConfig(source=str(tmp_path / "fresh"),
                                                                          seq_len=16), "train")[0])


def test_parallel_prepare_equals_one_process(tmp_path):
    glob = jsonl_corpus(tmp_path / "src", files=2, docs=20)
    one = prepare.prepare(glob, "byte", tmp_path / "one", shard_mb=0.001)
    two = prepare.prepare(glob, "byte", tmp_path / "two", shard_mb=0.001, processes=2)
    assert one["splits"] == two["splits"] and len(one["shards"]) > 2
    for name in (tmp_path / "one" / "shards").glob("*.npy"):
        assert name.read_bytes() == (tmp_path / "two" / "shards" / name.name).read_bytes()


@pytest.mark.parametrize("fraction,max_docs", [(1e-6, None), (0.999, None), (0.3, 37), (1e-6, 11)])
def test_max_documents_and_non_empty_sides_match_eval_mask(tmp_path, fraction, max_docs):
    glob = jsonl_corpus(tmp_path / "src")
    out = tmp_path / "out"
    prepare.prepare(glob, "byte", out, eval_fraction=fraction, max_documents=max_docs, shard_mb=TINY_SHARDS)
    raw = DataConfig(source=glob, seq_len=16, eval_fraction=fraction, max_documents=max_docs)
    for split in ("train", "eval"):
        cfg = DataConfig(source=str(out), seq_len=16, eval_fraction=fraction, max_documents=max_docs)
        ref, texts = reference_rows(raw, split)
        assert_rows_equal(pipeline._split(cfg, split)[0], ref)
        assert pipeline.split_info(cfg, split).documents == len(texts)


def test_formats_split_into_pieces_keep_document_keys(tmp_path):
    """Text, many-piece JSONL, multi-row-group Parquet and ArrayRecord: the same documents as one whole read."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    ar = pytest.importorskip("array_record.python.array_record_module")
    src = tmp_path / "src"
    jsonl_corpus(src, files=1, docs=50)
    (src / "a.txt").write_text("plain text document\n")
    pq.write_table(pa.table({"text": [f"row {i} " * (i % 4 + 1) for i in range(60)]}), src / "b.parquet",
                   row_group_size=7)
    w = ar.ArrayRecordWriter(str(src / "c.arrayrecord"), "group_size:1")
    for i in range(45):
        w.write(json.dumps({"text": f"record {i}"}).encode() if i % 2 else f"raw {i}".encode())
    w.close()
    files = sources.source_files(str(src / "*"))
    pieces = sources.pieces(files, 200)
    assert len(pieces) > 20 and {p.fmt for p in pieces} == {"text", "jsonl", "parquet", "arrayrecord"}
    docs = [d for p in pieces for d in sources.read_piece(p, "text")]
    whole = [d for p in sources.pieces(files, 1 << 30) for d in sources.read_piece(p, "text")]
    assert docs == whole and len({k for k, _ in docs}) == len(docs) == 1 + 50 + 60 + 45
    keys = [k for k, _ in docs]
    assert keys[:2] == ["a.txt", "b.parquet#0"] and keys[61] == "c.arrayrecord#0" and keys[106] == "part0.jsonl#1"
    assert "part0.jsonl#4" in keys and "part0.jsonl#5" not in keys and "part0.jsonl#6" in keys  # line 5 is blank


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, naming the culprit, nothing written.


def _one_line(fn, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        fn()
    assert "\n" not in str(info.value)
    return info


def _word_tokenizer(path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(50)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path))
    return str(path)


def test_refuses_to_mix_tokenizers(corpus, tmp_path):
    raw, prepared, out = corpus
    other = _word_tokenizer(tmp_path / "tokenizer.json")
    before = sorted(p.name for p in (out / "shards").iterdir())
    _one_line(lambda: prepare.prepare(raw.source, other, out, eval_fraction=0.2, shard_mb=TINY_SHARDS),
              r"prepared with another tokenizer")
    assert before == sorted(p.name for p in (out / "shards").iterdir())
    cfg = DataConfig(source=str(out), seq_len=16, eval_fraction=0.2, tokenizer=other)
    _one_line(lambda: make_dataset(cfg, "train", 4), r"was prepared with another tokenizer .* not data.tokenizer=")


def test_bad_shards_fail_in_one_line_naming_the_file(corpus):
    _, prepared, out = corpus
    shard = out / "shards" / "00003.train.tokens.npy"
    good = shard.read_bytes()

    def fails(pattern):
        pipeline._open.cache_clear()
        pipeline._mmap.cache_clear()
        return _one_line(lambda: take(make_dataset(prepared, "train", 4, seed=0), 1000), pattern)

    shard.unlink()
    fails(r"00003\.train\.tokens\.npy: missing shard file")
    shard.write_bytes(b"")
    fails(r"00003\.train\.tokens\.npy: corrupt shard \(0 bytes")
    shard.write_bytes(good[:-6])
    fails(r"00003\.train\.tokens\.npy: corrupt shard \(\d+ bytes, the manifest says")
    shard.write_bytes(b"garbage!" + good[8:])
    fails(r"00003\.train\.tokens\.npy: corrupt shard")
    shard.write_bytes(good)
    target = out / "shards" / "00004.train.tokens.npy"
    bad = np.load(target)
    np.save(target, np.where(np.arange(len(bad)) == 3, 4000, bad).astype(bad.dtype))
    fails(r"00004\.train\.tokens\.npy: token id 4000 is outside the vocabulary \(258\)")
    np.save(target, bad)
    (out / "manifest.json").unlink()
    fails(r"no manifest\.json, the prepare step did not finish")


def test_bad_sources_fail_before_anything_is_written(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    out = tmp_path / "out"
    _one_line(lambda: prepare.prepare(str(src / "a.jsonl"), "byte", out), r"a\.jsonl:2: no field 'text'")
    assert not out.exists()
    cfg = DataConfig(source=str(src / "a.jsonl"), cache_dir=str(tmp_path / "cache"))
    _one_line(lambda: make_dataset(cfg, "train", 2), r"a\.jsonl:2: no field 'text'")
    assert not any((tmp_path / "cache").glob("*/*"))
    _one_line(lambda: prepare.prepare(str(src / "none*.jsonl"), "byte", out), r"matched no files")
    _one_line(lambda: make_dataset(DataConfig(source=str(src)), "train", 2), r"matched no files")
    (src / "a.jsonl").write_text('{"text": "fine"}\n')
    prepare.prepare(str(src / "a.jsonl"), "byte", out, eval_fraction=0.0)
    _one_line(lambda: make_dataset(DataConfig(source=str(out), eval_fraction=0.1), "train", 2),
              r"data\.eval_fraction=0\.1 differs from 0\.0")
    _one_line(lambda: make_dataset(DataConfig(source=str(out), eval_fraction=0.0), "eval", 2),
              r"the eval split .* is empty")
    _one_line(lambda: make_dataset(DataConfig(source=str(out), eval_fraction=0.0), "train", 2, vocab_size=50),
              r"token id \d+ .* is >= model vocab_size 50")


def test_cli(tmp_path, capsys):
    glob = jsonl_corpus(tmp_path / "src", files=1, docs=10)
    assert prepare_cli.main(["--source", glob, "--out", str(tmp_path / "out"), "--processes", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'out'}: 10 documents (") and "MB/s" in line and "tokens/s" in line
    assert prepare_cli.main(["--source", glob, "--out", str(tmp_path / "out"), "--tokenizer", "nope.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.tokenizer: file") and "\n" not in err
    assert prepare_cli.main([]) == 2  # a usage error is one line too
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the following arguments are required: --source, --out") and "\n" not in err


@pytest.mark.slow
def test_grain_worker_processes_give_the_same_batches_and_exact_state(corpus):
    _, prepared, _ = corpus
    reference = take(make_dataset(prepared, "train", 4, seed=2), 12)
    cfg = DataConfig(source=prepared.source, seq_len=16, eval_fraction=0.2, workers=2)
    it = make_dataset(cfg, "train", 4, seed=2)
    first = take(it, 5)
    state = it.get_state()
    resumed = make_dataset(cfg, "train", 4, seed=2)
    resumed.set_state(json.loads(json.dumps(state)))
    assert_batches_equal(first + take(resumed, 7), reference)
