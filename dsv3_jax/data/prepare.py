"""The prepare step: a raw source -> token shards, an index and a manifest that training reads lazily.

`python -m dsv3_jax.tools.prepare --source GLOB --tokenizer byte|PATH --out DIR [--processes N]`.

Layout of DIR. `prepare.json` (the options and the tokenizer's identity, written first; a later run with another
tokenizer or other options is refused), `shards/NNNNN.{train,eval}.tokens.npy` (each split's documents of one shard
as `[bos] doc [eos] [bos] doc [eos] ...`, uint16 when the vocabulary fits, else int32),
`shards/NNNNN.{train,eval}.docs.npy` ((4, D) int64 per document: stream start, UTF-8 bytes, ordinal in the shard,
split hash as float64 bits), `shards/NNNNN.json` (the shard's counts and file sizes, written last: a shard without
it is unfinished and is redone on resume), and `manifest.json` (written when every shard is done): the tokenizer,
the counts, and for each split the ordered list of pieces `[shard, stream, doc_lo, doc_hi, tok_lo, tok_hi]` whose
concatenation is the split's token stream, exactly the stream `data.pack_documents` builds in memory.

A shard is a run of consecutive source pieces (`sources.py`) of about `shard_mb` MB of text, so the shards in order
hold the documents in source order. The split is decided per document (hash of its key < eval_fraction, as
`data.eval_mask`); `max_documents` and the rule that keeps both sides non-empty are applied when the manifest is
written, as ranges of documents, without rewriting a shard.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import time

import numpy as np

from dsv3_jax.data import atomic, sources
from dsv3_jax.data.tokenizer import identity, make_tokenizer
from dsv3_jax.errors import DataError

VERSION = 1


SPLITS = ("train", "eval")


def unit_hash(key: str) -> float:
    """A stable hash of a document key in [0, 1)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2.0**64


def concat_documents(docs: list[np.ndarray], bos_id: int, eos_id: int, dtype=np.int32) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """(stream, starts): `[bos] + doc + [eos]` for every document, concatenated, and where each bos is."""
    lengths = np.array([len(d) + 2 for d in docs], np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    stream = np.empty(int(ends[-1]) if len(docs) else 0, dtype)
    body = np.ones(len(stream), bool)
    body[starts], body[ends - 1] = False, False
    stream[starts], stream[ends - 1] = bos_id, eos_id
    stream[body] = np.concatenate(docs) if docs else []
    return stream, starts


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "int32"


def shard_files(out: pathlib.Path, index: int) -> dict[str, pathlib.Path]:
    d, n = out / "shards", f"{index:05d}"
    return {f"{s}.{kind}": d / f"{n}.{s}.{kind}.npy" for s in SPLITS for kind in ("tokens", "docs")}


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str):
    return make_tokenizer(spec)


def _encode(tok, texts: list[str]) -> list[np.ndarray]:
    if hasattr(tok, "encode_batch"):
        return [a for i in range(0, len(texts), 1024) for a in tok.encode_batch(texts[i:i + 1024])]
    return [tok.encode_array(t) for t in texts]


def _save(path: pathlib.Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic.write_with(path, write)


def make_shard(out: str, index: int, unit: list[sources.Piece], tokenizer: str, text_field: str,
               eval_fraction: float, dtype: str) -> dict:
    """Tokenise one unit of pieces into shard `index`; returns (and writes last) its json record."""
    tok = _tokenizer(tokenizer)
    docs = [d for p in unit for d in sources.read_piece(sources.Piece(*p), text_field)]
    u = np.array([unit_hash(k) for k, _ in docs], np.float64)
    is_eval = u < eval_fraction
    files = shard_files(pathlib.Path(out), index)
    record = {"index": index, "documents": len(docs), "files": {}}
    for split in SPLITS:
        ordinal = np.flatnonzero(is_eval == (split == "eval"))
        texts = [docs[i][1] for i in ordinal]
        encoded = _encode(tok, texts)
        stream, starts = concat_documents(encoded, tok.bos_id, tok.eos_id, np.dtype(dtype))
        nbytes = np.array([len(t.encode("utf-8")) for t in texts], np.int64)
        table = np.stack([starts, nbytes, ordinal.astype(np.int64), u[ordinal].view(np.int64)]) if len(texts) \
            else np.zeros((4, 0), np.int64)
        _save(files[f"{split}.tokens"], stream)
        _save(files[f"{split}.docs"], table)
        record[split] = {"documents": len(texts), "tokens": len(stream), "bytes": int(nbytes.sum()),
                         "max_token": int(max((a.max() for a in encoded if len(a)), default=-1))}
    record["files"] = {k: p.stat().st_size for k, p in files.items()}
    atomic.write_text(files["train.tokens"].parent / f"{index:05d}.json", json.dumps(record))
    return record


def _make_shard_star(args) -> dict:
    return make_shard(*args)


def finished_shard(out: pathlib.Path, index: int) -> dict | None:
    """The record of a finished shard whose files are all there with the recorded sizes, else None."""
    path = out / "shards" / f"{index:05d}.json"
    try:
        record = json.loads(path.read_text())
        ok = all(p.stat().st_size == record["files"][k] for k, p in shard_files(out, index).items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if ok else None


def _units(pieces: list[sources.Piece], shard_bytes: int) -> list[list[sources.Piece]]:
    """Consecutive pieces grouped into units of about `shard_bytes`."""
    units, size = [[]], 0
    for p in pieces:
        if units[-1] and size + p.size > shard_bytes:
            units.append([])
            size = 0
        units[-1].append(p)
        size += p.size
    return [u for u in units if u]


def _fingerprint(files) -> str:
    h = hashlib.sha256()
    for path, key, fmt in files:
        st = os.stat(path)
        h.update(f"{key}\0{fmt}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def options(source: str, tokenizer: str, fmt: str = "auto", text_field: str = "text", eval_fraction: float = 0.02,
            max_documents: int | None = None, shard_mb: float = 16) -> tuple[dict, list]:
    """The options that determine a prepared directory (what prepare.json pins), and the source's files."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    if max_documents is not None and max_documents <= 0:
        raise DataError(f"data.max_documents must be positive or null, got {max_documents}")
    if shard_mb <= 0:
        raise DataError(f"--shard-mb must be positive, got {shard_mb}")
    tok = make_tokenizer(tokenizer)
    files = sources.source_files(source, fmt)
    return {"version": VERSION, "tokenizer": identity(tok), "source": source, "format": fmt,
            "text_field": text_field, "eval_fraction": eval_fraction, "max_documents": max_documents,
            "shard_mb": shard_mb, "dtype": token_dtype(tok.vocab_size), "files": _fingerprint(files)}, files


def check_options(out: pathlib.Path, opts: dict) -> None:
    """Refuse a directory prepared with another tokenizer or other options."""
    try:
        old = json.loads((out / "prepare.json").read_text())
    except (OSError, ValueError):
        raise DataError(f"{out}: unreadable prepare.json; use an empty --out directory") from None
    if old.get("tokenizer") != opts["tokenizer"]:
        raise DataError(f"{out} holds data prepared with another tokenizer ({old.get('tokenizer')}); "
                        f"use a new --out for {opts['tokenizer']}")
    diff = sorted(k for k in opts if old.get(k) != opts[k])
    if diff:
        raise DataError(f"{out} was prepared with other options ({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); "
                        "use a new --out")


def _extreme(out: pathlib.Path, ranges: list, split: str, pick) -> tuple[float, int, int]:
    """(hash, shard, doc) of the lowest (pick=min) or highest (pick=max) hash among the documents of `ranges`."""
    best = None
    for shard, lo, hi in ranges:
        h = np.load(shard_files(out, shard)[f"{split}.docs"], mmap_mode="r")[3, lo:hi].view(np.float64)
        j = int(np.argmin(h) if pick is min else np.argmax(h))
        best = (float(h[j]), shard, lo + j) if best is None else pick(best, (float(h[j]), shard, lo + j))
    return best


def _pieces_of(records: list[dict], max_documents: int | None, eval_fraction: float, out: pathlib.Path) -> dict:
    """Per split, the document ranges [shard, doc_lo, doc_hi(, stream)] that make it: the source-order prefix of
    max_documents, and when a side is left empty, the document eval_mask would move over (lowest hash to eval,
    highest hash to train)."""
    ranges = {s: [] for s in SPLITS}
    seen = 0
    for r in records:
        i = r["index"]
        keep = {s: r[s]["documents"] for s in SPLITS}
        if max_documents is not None and seen + r["documents"] > max_documents:  # docs with ordinal < the rest
            keep = {s: int(np.searchsorted(np.load(shard_files(out, i)[f"{s}.docs"], mmap_mode="r")[2],
                                           max_documents - seen)) for s in SPLITS}
        for s in SPLITS:
            if keep[s]:
                ranges[s].append([i, 0, keep[s]])
        seen += r["documents"]
        if max_documents is not None and seen >= max_documents:
            break
    total = sum(hi - lo for s in SPLITS for _, lo, hi in ranges[s])
    if eval_fraction > 0 and total >= 2:
        for src, dst, pick in (("train", "eval", min), ("eval", "train", max)):
            if not ranges[dst]:
                _, i, j = _extreme(out, ranges[src], src, pick)
                ranges[dst] = [[i, j, j + 1, src]]
                new = []
                for shard, lo, hi in ranges[src]:
                    if shard == i:
                        new += [[shard, a, b] for a, b in ((lo, j), (j + 1, hi)) if a < b]
                    else:
                        new.append([shard, lo, hi])
                ranges[src] = new
    return ranges


def write_manifest(out: pathlib.Path, opts: dict, records: list[dict]) -> dict:
    """The manifest: per split, the ordered pieces of the token stream and their counts."""
    ranges = _pieces_of(records, opts["max_documents"], opts["eval_fraction"], out)
    by_index = {r["index"]: r for r in records}
    splits = {}
    for split in SPLITS:
        pieces, docs, tokens, nbytes, max_token = [], 0, 0, 0, -1
        for rng in ranges[split]:
            shard, lo, hi = rng[:3]
            stream = rng[3] if len(rng) > 3 else split
            files = shard_files(out, shard)
            table = np.load(files[f"{stream}.docs"], mmap_mode="r")
            n_tok = by_index[shard][stream]["tokens"]
            tok_lo = int(table[0, lo])
            tok_hi = int(table[0, hi]) if hi < table.shape[1] else n_tok
            pieces.append([shard, stream, lo, hi, tok_lo, tok_hi])
            docs, tokens = docs + hi - lo, tokens + tok_hi - tok_lo
            nbytes += int(np.asarray(table[1, lo:hi]).sum())
            max_token = max(max_token, by_index[shard][stream]["max_token"])
        splits[split] = {"documents": docs, "target_tokens": tokens - docs, "bytes": nbytes, "max_token": max_token,
                         "pieces": pieces}
    used = sorted({p[0] for s in SPLITS for p in splits[s]["pieces"]})
    manifest = {**opts, "shards": {str(i): by_index[i]["files"] for i in used}, "splits": splits}
    atomic.write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def _context():
    """Worker processes are spawned (forking a process that runs JAX threads can deadlock)."""
    return multiprocessing.get_context("spawn")


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent, which stops them: one `interrupted` line, not a traceback each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_out(out: pathlib.Path) -> None:
    """--out must be a directory or a path that can become one."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise DataError(f"--out {out}: {p} is a file, not a directory")
            return


def _remove_temporaries(out: pathlib.Path) -> None:
    """The hidden temporaries of writes that an interrupted run (or its killed workers) left unfinished."""
    for d in (out, out / "shards"):
        if d.is_dir():
            for tmp in d.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def prepare(source: str, tokenizer: str, out: str | pathlib.Path, fmt: str = "auto", text_field: str = "text",
            eval_fraction: float = 0.02, max_documents: int | None = None, processes: int = 1,
            shard_mb: float = 16, log=None) -> dict:
    """Tokenise `source` into shards under `out` (resuming a partial run); returns the manifest."""
    out = pathlib.Path(out).expanduser()
    _check_out(out)
    opts, files = options(source, tokenizer, fmt, text_field, eval_fraction, max_documents, shard_mb)
    if processes <= 0:
        raise DataError(f"--processes must be positive, got {processes}")
    fresh = not (out / "prepare.json").exists()
    if not fresh:
        check_options(out, opts)
        if (out / "manifest.json").exists():
            return json.loads((out / "manifest.json").read_text())
    elif out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise DataError(f"--out {out} is not empty and holds no prepare.json")
    units = _units(sources.pieces(files, int(shard_mb * 2**20)), int(shard_mb * 2**20))
    if fresh:  # prepare.json first: a concurrent run (another process, same cache dir) then finds it
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / "prepare.json", json.dumps(opts, indent=1) + "\n")
    (out / "shards").mkdir(exist_ok=True)
    try:
        records = _run(out, opts, tokenizer, units, processes, log)
        if not sum(r["documents"] for r in records):
            raise DataError(f"data.source {source!r} holds no non-empty documents (no text to tokenise)")
    except DataError:
        if fresh:  # bad input: leave nothing behind (a resumed directory keeps its finished shards)
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException:  # Ctrl-C, a crash: finished shards stay (a rerun resumes), unfinished writes go
        _remove_temporaries(out)
        raise
    return write_manifest(out, opts, records)


def _run(out: pathlib.Path, opts: dict, tokenizer: str, units: list, processes: int, log) -> list[dict]:
    """Make the unfinished shards in order (at most `processes` at once) until max_documents are covered."""
    limit = opts["max_documents"]
    args = [(str(out), i, [tuple(p) for p in u], tokenizer, opts["text_field"], opts["eval_fraction"],
             opts["dtype"]) for i, u in enumerate(units)]
    records, pending, seen, nxt = {}, {}, 0, 0
    t0, done_bytes = time.perf_counter(), 0
    with (_context().Pool(processes, _ignore_sigint) if processes > 1 else contextlib.nullcontext()) as pool:
        for i in range(len(units)):
            while nxt < len(units) and (limit is None or seen < limit) and len(pending) < max(2 * processes, 1):
                rec = finished_shard(out, nxt)
                if rec is not None:
                    records[nxt] = rec
                elif pool is not None:
                    pending[nxt] = pool.apply_async(_make_shard_star, (args[nxt],))
                else:
                    pending[nxt] = None
                nxt += 1
            if i not in records and i not in pending:
                break
            if i in pending:
                job = pending.pop(i)
                records[i] = job.get() if job is not None else make_shard(*args[i])
                done_bytes += sum(p.size for p in units[i])
                if log:
                    dt = time.perf_counter() - t0
                    log(f"shard {i + 1}/{len(units)}: {records[i]['documents']} documents, "
                        f"{done_bytes / 2**20 / dt:.1f} MB/s")
            seen += records[i]["documents"]
            if limit is not None and seen >= limit:
                break
    return [records[i] for i in sorted(records)]
