"""The input pipeline: local text sources -> documents -> train/eval split -> packed rows -> grain batches.

Batch layout. `make_dataset` yields dicts of int32 numpy arrays, each (b, seq_len + 1) with b = global batch / process
count: `tokens`, `segment_ids` (1, 2, 3, ... per document within a row, 0 = padding) and `positions` (0, 1, ...
restarting for each document in a row). The extra column is for the shift: inputs are `[:, :-1]`, targets
`[:, 1:]`, and a target is valid where `segment_ids[:, 1:] == segment_ids[:, :-1] != 0`.

Packing (greedy, no padding inside the corpus). Every document becomes `[bos] + tokens + [eos]`; the documents of a
split are concatenated into one stream in source order, and row r is `stream[r*S : r*S + S + 1]` (S = seq_len):
adjacent rows share one token, so with the mask above every stream token except the bos tokens is a target exactly
once per epoch. A document that crosses a row boundary continues in the next row as a new segment whose positions
restart at 0 (it attends only within the row, and positions stay below seq_len, within the rotary range). Only the
last row of a split has padding (tokens 0, segment 0).

Splits. Each document is keyed by its path (plus the record number in jsonl/parquet/arrayrecord files); a document
is held out for eval when a hash of its key falls below `eval_fraction`, so train and eval never share a document and
the split does not depend on the seed. When that leaves a side empty, the lowest (or highest) hash moves over.

Order, sharding, state. The train rows are shuffled by grain (`MapDataset.shuffle`, reshuffled each epoch), repeated
forever and cut into per-process batches: the k-th global batch is rows k*B .. k*B+B-1 of the shuffled order and
process i of n takes the i-th contiguous block of B/n of them, so the concatenation over processes is exactly the
single-process batch. The eval split is finite (one deterministic pass in stream order, no shuffle; the last global
batch is filled with padding rows so every process yields the same number of batches); build a fresh iterator for
each evaluation. The returned grain `DatasetIterator` has a JSON-serialisable `get_state()` / `set_state(state)`, and
works with orbax through `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.

The loaded corpus is cached per process (keyed by the config fields that shape it), so eval iterators are cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib
import json
import math
import os
import pathlib
import sysconfig
from collections.abc import Iterator

import grain
import numpy as np

from dsv3_jax.config import DataConfig
from dsv3_jax.tokenizer import DataError, Tokenizer, make_tokenizer

__all__ = ["DataConfig", "DataError", "PackedRows", "SplitInfo", "Tokenizer", "eval_mask", "make_dataset",
           "make_tokenizer", "pack_documents", "read_documents", "split_info"]

FORMATS = ("auto", "text", "jsonl", "parquet", "arrayrecord")
_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
               ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # rows are in memory: no reader threads


# ----------------------------------------------------------------------------------------------------------------
# Sources: each yields (key, text) documents in a deterministic order.


def _stdlib_documents() -> Iterator[tuple[str, str]]:
    """The Python standard library's own `.py` files (no site-packages, no test directories), sorted by path."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = pathlib.Path(dirpath) / name
            yield "stdlib/" + path.relative_to(root).as_posix(), path.read_text(encoding="utf-8", errors="replace")


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: document keys are relative to it."""
    parts = pathlib.Path(pattern).parts
    fixed = []
    for p in parts:
        if glob.has_magic(p):
            break
        fixed.append(p)
    base = os.path.join(*fixed) if fixed else "."
    return base if os.path.isdir(base) else os.path.dirname(base) or "."


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return _EXT_FORMAT.get(pathlib.Path(path).suffix.lower(), "text")


def _field(record: dict, field: str, where: str) -> str | None:
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (data.text_field); keys: {sorted(record)[:10]}")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


def _read_jsonl(path: str, field: str) -> Iterator[tuple[int, str | None]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with field {field!r}")
            yield lineno, _field(record, field, f"{path}:{lineno}")


def _require(module: str, package: str, fmt: str):
    """Import an optional reader, or fail naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"data.format {fmt} needs the `{package}` package (pip install {package})") from None


def _read_parquet(path: str, field: str) -> Iterator[tuple[int, str | None]]:
    pq = _require("pyarrow.parquet", "pyarrow", "parquet")

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001  (pyarrow raises several unrelated types for a bad file)
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (data.text_field); columns: {names[:10]}")
    column = pf.read(columns=[field]).column(field).to_pylist()
    for i, value in enumerate(column):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: column {field!r} holds {type(value).__name__}, not strings")
        yield i, value


def _read_arrayrecord(path: str, field: str) -> Iterator[tuple[int, str | None]]:
    """Each record is UTF-8 text, or a JSON object (a record starting with '{' that parses) holding `field`."""
    module = _require("array_record.python.array_record_module", "array-record", "arrayrecord")
    try:
        reader = module.ArrayRecordReader(path)
        records = reader.read_all()
        reader.close()
    except Exception as e:  # noqa: BLE001  (the C++ reader raises RuntimeError/ValueError variants)
        raise DataError(f"{path}: not a readable ArrayRecord file ({str(e).splitlines()[0]})") from None
    for i, raw in enumerate(records):
        text = raw.decode("utf-8", errors="replace")
        if text.lstrip().startswith("{"):
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                text = _field(record, field, f"{path}: record {i}")
        yield i, text


def _glob_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    pattern = os.path.expanduser(cfg.source)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"data.source {cfg.source!r} matched no files (use 'stdlib' or a glob of local files)")
    base = _glob_base(pattern)
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "arrayrecord": _read_arrayrecord}
    for path in paths:
        key = os.path.relpath(path, base).replace(os.sep, "/")
        fmt = _format_of(path, cfg.format)
        if fmt == "text":
            yield key, pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
            continue
        for index, text in readers[fmt](path, cfg.text_field):
            if text is not None:
                yield f"{key}#{index}", text


def read_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """The non-empty (key, text) documents of the source, in source order, at most `max_documents` of them."""
    if cfg.format not in FORMATS:
        raise DataError(f"data.format must be one of {list(FORMATS)}, got {cfg.format!r}")
    if cfg.max_documents is not None and cfg.max_documents <= 0:
        raise DataError(f"data.max_documents must be positive or null, got {cfg.max_documents}")
    docs = []
    for key, text in (_stdlib_documents() if cfg.source == "stdlib" else _glob_documents(cfg)):
        if text:
            docs.append((key, text))
            if cfg.max_documents is not None and len(docs) >= cfg.max_documents:
                break
    if not docs:
        raise DataError(f"data.source {cfg.source!r} holds no non-empty documents")
    return docs


def _unit_hash(key: str) -> float:
    """A stable hash of a document key in [0, 1)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2.0**64


def eval_mask(keys: list[str], eval_fraction: float) -> np.ndarray:
    """(D,) bool: which documents are held out. Both sides are kept non-empty when there are >= 2 documents."""
    u = np.array([_unit_hash(k) for k in keys])
    n_eval = int((u < eval_fraction).sum())
    if eval_fraction > 0 and len(keys) >= 2:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    is_eval = np.zeros(len(keys), bool)
    is_eval[np.argsort(u, kind="stable")[:n_eval]] = True
    return is_eval


# ----------------------------------------------------------------------------------------------------------------
# Packing.


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of seq_len + 1 tokens cut from one document stream (see the module docstring); a random-access source.

    Indices at or beyond the natural row count (up to `length`) are all-padding rows.
    """

    stream: np.ndarray  # (N,) int32: [bos] doc_0 [eos] [bos] doc_1 [eos] ...
    doc_starts: np.ndarray  # (D,) int64: stream index of each document's bos
    seq_len: int
    length: int | None = None

    @property
    def num_rows(self) -> int:
        return max(1, math.ceil((len(self.stream) - 1) / self.seq_len))

    def __len__(self) -> int:
        return self.num_rows if self.length is None else self.length

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        width = self.seq_len + 1
        tokens, segment_ids, positions = (np.zeros(width, np.int32) for _ in range(3))
        if r < self.num_rows:
            start = r * self.seq_len
            idx = np.arange(start, min(start + width, len(self.stream)))
            doc = np.searchsorted(self.doc_starts, idx, side="right") - 1  # document of each token
            n = len(idx)
            tokens[:n] = self.stream[idx]
            segment_ids[:n] = doc - doc[0] + 1
            positions[:n] = idx - np.maximum(self.doc_starts[doc], start)  # a continuation restarts at 0
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    def padded_to(self, length: int) -> PackedRows:
        return dataclasses.replace(self, length=length)


def pack_documents(docs: list[np.ndarray], bos_id: int, eos_id: int, seq_len: int) -> PackedRows:
    """Concatenate `[bos] + doc + [eos]` for every tokenised document into one stream of rows."""
    lengths = np.array([len(d) + 2 for d in docs], np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    stream = np.empty(int(ends[-1]) if len(docs) else 0, np.int32)
    body = np.ones(len(stream), bool)
    body[starts], body[ends - 1] = False, False
    stream[starts], stream[ends - 1] = bos_id, eos_id
    stream[body] = np.concatenate(docs) if docs else []
    return PackedRows(stream, starts, seq_len)


# ----------------------------------------------------------------------------------------------------------------
# The corpus: read, split, tokenise and pack once per process.


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """Sizes of one split. `target_tokens` counts every token but bos (the ones a model predicts)."""

    documents: int
    target_tokens: int
    bytes: int
    rows: int

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per predicted token: bits per byte = loss_nats_per_token / (ln 2 * bytes_per_token)."""
        return self.bytes / max(self.target_tokens, 1)


@dataclasses.dataclass(frozen=True)
class _Split:
    rows: PackedRows
    info: SplitInfo
    max_token: int


def _tokenize(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if hasattr(tok, "encode_batch"):
        return [a for i in range(0, len(texts), 1024) for a in tok.encode_batch(texts[i:i + 1024])]
    return [tok.encode_array(t) for t in texts]


def _make_split(tok: Tokenizer, texts: list[str], seq_len: int) -> _Split | None:
    if not texts:
        return None
    docs = _tokenize(tok, texts)
    rows = pack_documents(docs, tok.bos_id, tok.eos_id, seq_len)
    info = SplitInfo(documents=len(texts), target_tokens=len(rows.stream) - len(texts),
                     bytes=sum(len(t.encode("utf-8")) for t in texts), rows=rows.num_rows)
    return _Split(rows, info, int(rows.stream.max()))


@functools.lru_cache(maxsize=4)
def _load(source: str, fmt: str, text_field: str, tokenizer: str, seq_len: int, eval_fraction: float,
          max_documents: int | None) -> dict[str, _Split | None]:
    if seq_len <= 0:
        raise DataError(f"data.seq_len must be positive, got {seq_len}")
    if not 0 <= eval_fraction < 1:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    cfg = DataConfig(source=source, format=fmt, text_field=text_field, max_documents=max_documents)
    tok = make_tokenizer(tokenizer)
    docs = read_documents(cfg)
    is_eval = eval_mask([k for k, _ in docs], eval_fraction)
    return {split: _make_split(tok, [t for (_, t), e in zip(docs, is_eval) if e == (split == "eval")], seq_len)
            for split in ("train", "eval")}


def _load_cfg(cfg: DataConfig) -> dict[str, _Split | None]:
    return _load(cfg.source, cfg.format, cfg.text_field, cfg.tokenizer, cfg.seq_len, cfg.eval_fraction,
                 cfg.max_documents)


def _split(cfg: DataConfig, split: str) -> _Split:
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    s = _load_cfg(cfg)[split]
    if s is None:
        raise DataError(f"the {split} split of data.source {cfg.source!r} is empty "
                        f"(data.eval_fraction={cfg.eval_fraction}, data.max_documents={cfg.max_documents})")
    return s


def split_info(cfg: DataConfig, split: str = "eval") -> SplitInfo:
    """Documents, predicted tokens, bytes and rows of a split (loads and caches the corpus)."""
    return _split(cfg, split).info


# ----------------------------------------------------------------------------------------------------------------
# The grain pipeline.


def _mix_seed(*seeds: int) -> int:
    """One 32-bit shuffle seed from several integers (nearby inputs give unrelated seeds)."""
    digest = hashlib.blake2b(":".join(str(int(s)) for s in seeds).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def make_dataset(data_cfg: DataConfig, split: str, batch_size: int, shard_index: int = 0, shard_count: int = 1,
                 seed: int = 0, vocab_size: int | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of this process's batches (dicts of (batch_size // shard_count, seq_len + 1) int32).

    `batch_size` is the global batch; "train" repeats forever, reshuffled each epoch from (data.shuffle_seed, seed);
    "eval" is one finite deterministic pass. `vocab_size`: fail if the data holds a token id the model cannot embed.
    """
    if batch_size <= 0:
        raise DataError(f"global_batch_size must be positive, got {batch_size}")
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} is out of range for {shard_count} processes")
    if batch_size % shard_count:
        raise DataError(f"global_batch_size {batch_size} is not divisible by the process count {shard_count}")
    s = _split(data_cfg, split)
    if vocab_size is not None:  # both splits, so a too-small vocabulary fails at the start, not at the first eval
        max_token = max(x.max_token for x in _load_cfg(data_cfg).values() if x is not None)
        if max_token >= vocab_size:
            raise DataError(f"token id {max_token} from data.tokenizer={data_cfg.tokenizer!r} is >= model "
                            f"vocab_size {vocab_size}")
    local = batch_size // shard_count
    if split == "train":
        ds = grain.MapDataset.source(s.rows).shuffle(seed=_mix_seed(data_cfg.shuffle_seed, seed)).repeat()
    else:
        ds = grain.MapDataset.source(s.rows.padded_to(math.ceil(s.rows.num_rows / batch_size) * batch_size))
    # Local batches of consecutive rows; process i takes every n-th, i.e. block i of each global batch.
    ds = ds.batch(local, drop_remainder=True)[shard_index::shard_count]
    return iter(ds.to_iter_dataset(_READ_OPTIONS))
