"""The input pipeline: a source -> prepared token shards -> packed rows, read lazily -> grain batches.

Batch layout. `make_dataset` yields dicts of int32 numpy arrays, each (b, seq_len + 1) with b = global batch / process
count: `tokens`, `segment_ids` (1, 2, 3, ... per document within a row, 0 = padding) and `positions` (0, 1, ...
restarting for each document in a row). The extra column is for the shift: inputs are `[:, :-1]`, targets
`[:, 1:]`, and a target is valid where `segment_ids[:, 1:] == segment_ids[:, :-1] != 0`.

Packing (greedy, no padding inside the corpus). Every document becomes `[bos] + tokens + [eos]`; the documents of a
split are concatenated into one stream in source order, and row r is `stream[r*T : r*T + T + 1]` (T = seq_len):
adjacent rows share one token, so with the mask above every stream token except the bos tokens is a target exactly
once per epoch. A document that crosses a row boundary continues in the next row as a new segment whose positions
restart at 0 (it attends only within the row, and positions stay below seq_len, within the rotary range). Only the
last row of a split has padding (tokens 0, segment 0).

Storage. The stream lives on disk in the shards of a prepared directory (`prepare.py`; `data.source` may name one);
a raw source (`stdlib`, a glob) is prepared on the fly into `data.cache_dir` once (one shard of text in memory at a
time) and read from there. A row is read from the memory-mapped shards it overlaps, so host memory does not grow with
the corpus. `PackedRows` / `pack_documents` are the same rows built in memory: the definition the tests compare with.

Splits. Each document is keyed by its path (plus the record number in jsonl/parquet/arrayrecord files); a document
is held out for eval when a hash of its key falls below `eval_fraction`, so train and eval never share a document and
the split does not depend on the seed. When that leaves a side empty, the lowest (or highest) hash moves over.

Order, sharding, state. The train rows are shuffled by grain (`MapDataset.shuffle`, reshuffled each epoch), repeated
forever and cut into per-process batches: the k-th global batch is rows k*B .. k*B+B-1 of the shuffled order and
process i of n takes the i-th contiguous block of B/n of them, so the concatenation over processes is exactly the
single-process batch, and a process reads only its own rows. The eval split is finite (one deterministic pass in
stream order, no shuffle; the last global batch is filled with padding rows so every process yields the same number
of batches); build a fresh iterator for each evaluation. The returned grain `DatasetIterator` has a JSON-serialisable
`get_state()` / `set_state(state)` (with `data.workers` > 0 rows are assembled in grain worker processes and the
state stays exact), and works with orbax through `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import sys
from typing import TYPE_CHECKING

import numpy as np

from dsv3_jax.config import DataConfig
from dsv3_jax.data import prepare as prep
from dsv3_jax.data import sources
from dsv3_jax.data.tokenizer import Tokenizer, identity, make_tokenizer
from dsv3_jax.errors import DataError

if TYPE_CHECKING:  # grain is imported where batches are made: runs fed other batches (benchmarks) need no grain
    import grain

__all__ = ["DataConfig", "DataError", "PackedRows", "ShardRows", "SplitInfo", "Tokenizer", "eval_mask",
           "make_dataset", "make_tokenizer", "open_corpus", "pack_documents", "read_documents", "split_info"]


FORMATS = sources.FORMATS


def read_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """The non-empty (key, text) documents of the source, in source order, at most `max_documents` of them."""
    if cfg.max_documents is not None and cfg.max_documents <= 0:
        raise DataError(f"data.max_documents must be positive or null, got {cfg.max_documents}")
    docs = []
    for piece in sources.pieces(sources.source_files(cfg.source, cfg.format), 1 << 26):
        for key, text in sources.read_piece(piece, cfg.text_field):
            docs.append((key, text))
            if cfg.max_documents is not None and len(docs) >= cfg.max_documents:
                return docs
    if not docs:
        raise DataError(f"data.source {cfg.source!r} holds no non-empty documents")
    return docs


def eval_mask(keys: list[str], eval_fraction: float) -> np.ndarray:
    """(D,) bool: which documents are held out. Both sides are kept non-empty when there are >= 2 documents."""
    u = np.array([prep.unit_hash(k) for k in keys])
    n_eval = int((u < eval_fraction).sum())
    if eval_fraction > 0 and len(keys) >= 2:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    is_eval = np.zeros(len(keys), bool)
    is_eval[np.argsort(u, kind="stable")[:n_eval]] = True
    return is_eval


def _cut(a: int, b: int, tokens: np.ndarray, starts: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """Row stream[a:b] (b - a <= width) from its tokens and the stream starts of the documents it touches
    (sorted, starts[0] <= a), padded to `width`."""
    out = {k: np.zeros(width, np.int32) for k in ("tokens", "segment_ids", "positions")}
    if b <= a:
        return out
    idx = np.arange(a, b)
    doc = np.searchsorted(starts, idx, side="right") - 1  # document of each token
    n = b - a
    out["tokens"][:n] = tokens
    out["segment_ids"][:n] = doc - doc[0] + 1
    out["positions"][:n] = idx - np.maximum(starts[doc], a)  # a continuation restarts at 0
    return out


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of seq_len + 1 tokens cut from one in-memory document stream (see the module docstring).

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
        if r >= self.num_rows:
            return _cut(0, 0, np.zeros(0, np.int32), np.zeros(1, np.int64), width)
        a = r * self.seq_len
        b = min(a + width, len(self.stream))
        return _cut(a, b, self.stream[a:b], self.doc_starts, width)

    def padded_to(self, length: int) -> PackedRows:
        return dataclasses.replace(self, length=length)


def pack_documents(docs: list[np.ndarray], bos_id: int, eos_id: int, seq_len: int) -> PackedRows:
    """Concatenate `[bos] + doc + [eos]` for every tokenised document into one stream of rows."""
    stream, starts = prep.concat_documents(docs, bos_id, eos_id)
    return PackedRows(stream, starts, seq_len)


@functools.lru_cache(maxsize=256)
def _mmap(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: corrupt shard ({str(e).splitlines()[0]})") from None


@dataclasses.dataclass(frozen=True)
class ShardRows:
    """The same rows as PackedRows, read on demand from the memory-mapped shards of a prepared split.

    `pieces[k]` = (tokens file, docs file, tok_lo, tok_hi, doc_lo, doc_hi): a range of one shard stream;
    `offsets[k]` is where piece k starts in the split stream.
    """

    pieces: tuple[tuple[str, str, int, int, int, int], ...]
    offsets: tuple[int, ...]  # (K + 1,)
    seq_len: int
    vocab_size: int
    length: int | None = None

    @property
    def num_rows(self) -> int:
        return max(1, math.ceil((self.offsets[-1] - 1) / self.seq_len))

    def __len__(self) -> int:
        return self.num_rows if self.length is None else self.length

    def padded_to(self, length: int) -> ShardRows:
        return dataclasses.replace(self, length=length)

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        width = self.seq_len + 1
        if r >= self.num_rows:
            return _cut(0, 0, np.zeros(0, np.int32), np.zeros(1, np.int64), width)
        a = r * self.seq_len
        b = min(a + width, self.offsets[-1])
        tokens, starts = [], []
        k = int(np.searchsorted(self.offsets, a, side="right")) - 1
        while k < len(self.pieces) and self.offsets[k] < b:
            tok_path, doc_path, tok_lo, _, doc_lo, doc_hi = self.pieces[k]
            off = self.offsets[k]
            lo, hi = max(a, off) - off + tok_lo, min(b, self.offsets[k + 1]) - off + tok_lo
            t = np.asarray(_mmap(tok_path)[lo:hi]).astype(np.int32)
            if len(t) and (t.max() >= self.vocab_size or t.min() < 0):
                raise DataError(f"{tok_path}: token id {int(t.max())} is outside the vocabulary "
                                f"({self.vocab_size}); the shard is corrupt")
            doc_starts = _mmap(doc_path)[0, doc_lo:doc_hi]
            d0 = int(np.searchsorted(doc_starts, lo, side="right")) - 1
            d1 = int(np.searchsorted(doc_starts, hi, side="left"))
            tokens.append(t)
            starts.append(np.asarray(doc_starts[max(d0, 0):d1]) - tok_lo + off)
            k += 1
        return _cut(a, b, np.concatenate(tokens), np.concatenate(starts), width)


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
class Corpus:
    dir: pathlib.Path
    manifest: dict


def _is_prepared(source: str) -> bool:
    p = pathlib.Path(source).expanduser()
    return p.is_dir() and ((p / "manifest.json").exists() or (p / "prepare.json").exists())


def _check_shards(root: pathlib.Path, manifest: dict) -> None:
    """Every shard file the manifest uses exists with its recorded size and a readable .npy header."""
    dtype = np.dtype(manifest["dtype"])
    for index, sizes in manifest["shards"].items():
        for kind, path in prep.shard_files(root, int(index)).items():
            if not path.is_file():
                raise DataError(f"{path}: missing shard file (listed in {root / 'manifest.json'})")
            size = path.stat().st_size
            if size == 0 or size != sizes[kind]:
                raise DataError(f"{path}: corrupt shard ({size} bytes, the manifest says {sizes[kind]})")
            try:
                with open(path, "rb") as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dt = read(f)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: corrupt shard ({str(e).splitlines()[0]})") from None
            want = dtype if kind.endswith("tokens") else np.dtype(np.int64)
            if dt != want or len(shape) != (1 if kind.endswith("tokens") else 2):
                raise DataError(f"{path}: corrupt shard (array {dt}{list(shape)}, expected {want})")


def _read_manifest(root: pathlib.Path) -> dict:
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"data.source {str(root)!r}: no manifest.json, the prepare step did not finish (run it again "
                        "with the same --out to resume)")
    try:
        manifest = json.loads(path.read_text())
        if not all(k in manifest for k in ("splits", "shards", "tokenizer", "dtype")):
            raise ValueError("missing splits, shards, tokenizer or dtype")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({type(e).__name__}: {str(e)[:100]})") from None
    if manifest.get("version") != prep.VERSION:
        raise DataError(f"{path}: format version {manifest.get('version')}, this code reads {prep.VERSION}")
    return manifest


def _cache_key(opts: dict) -> str:
    return hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _open(source: str, fmt: str, text_field: str, tokenizer: str, eval_fraction: float, max_documents: int | None,
          cache_dir: str, processes: int) -> Corpus:
    tok_id = identity(make_tokenizer(tokenizer))
    if _is_prepared(source):
        root = pathlib.Path(source).expanduser()
        manifest = _read_manifest(root)
        if manifest["tokenizer"] != tok_id:
            raise DataError(f"data.source {source!r} was prepared with another tokenizer ({manifest['tokenizer']}), "
                            f"not data.tokenizer={tokenizer!r} ({tok_id})")
        for field, value in (("eval_fraction", eval_fraction), ("max_documents", max_documents)):
            if value != manifest.get(field) and not (field == "max_documents" and value is None):
                raise DataError(f"data.{field}={value} differs from {manifest.get(field)} in {root / 'manifest.json'} "
                                "(the split is fixed when data is prepared)")
    else:
        opts, _ = prep.options(source, tokenizer, fmt, text_field, eval_fraction, max_documents)
        root = pathlib.Path(cache_dir).expanduser() / _cache_key(opts)
        if not (root / "manifest.json").exists():
            print(f"preparing data.source {source!r} into {root}", file=sys.stderr, flush=True)
        manifest = prep.prepare(source, tokenizer, root, fmt, text_field, eval_fraction, max_documents, processes)
    _check_shards(root, manifest)
    return Corpus(root, manifest)


def open_corpus(cfg: DataConfig) -> Corpus:
    """The prepared corpus of `cfg.source` (prepared into the cache first when it is a raw source)."""
    if cfg.seq_len <= 0:
        raise DataError(f"data.seq_len must be positive, got {cfg.seq_len}")
    if not 0 <= cfg.eval_fraction < 1:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.max_documents is not None and cfg.max_documents <= 0:
        raise DataError(f"data.max_documents must be positive or null, got {cfg.max_documents}")
    if cfg.format not in FORMATS:
        raise DataError(f"data.format must be one of {list(FORMATS)}, got {cfg.format!r}")
    return _open(cfg.source, cfg.format, cfg.text_field, cfg.tokenizer, cfg.eval_fraction, cfg.max_documents,
                 cfg.cache_dir, cfg.prepare_processes)


def _split(cfg: DataConfig, split: str) -> tuple[ShardRows, dict]:
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    corpus = open_corpus(cfg)
    s = corpus.manifest["splits"][split]
    if not s["documents"]:
        raise DataError(f"the {split} split of data.source {cfg.source!r} is empty "
                        f"(data.eval_fraction={cfg.eval_fraction}, data.max_documents={cfg.max_documents})")
    pieces, offsets = [], [0]
    for shard, stream, doc_lo, doc_hi, tok_lo, tok_hi in s["pieces"]:
        files = prep.shard_files(corpus.dir, shard)
        pieces.append((str(files[f"{stream}.tokens"]), str(files[f"{stream}.docs"]), tok_lo, tok_hi, doc_lo, doc_hi))
        offsets.append(offsets[-1] + tok_hi - tok_lo)
    return ShardRows(tuple(pieces), tuple(offsets), cfg.seq_len, corpus.manifest["tokenizer"]["vocab_size"]), s


def split_info(cfg: DataConfig, split: str = "eval") -> SplitInfo:
    """Documents, predicted tokens, bytes and rows of a split (from the manifest)."""
    rows, s = _split(cfg, split)
    return SplitInfo(s["documents"], s["target_tokens"], s["bytes"], rows.num_rows)


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
    if data_cfg.workers < 0:
        raise DataError(f"data.workers must be >= 0, got {data_cfg.workers}")
    rows, _ = _split(data_cfg, split)
    if vocab_size is not None:  # both splits, so a too-small vocabulary fails at the start, not at the first eval
        max_token = max(s["max_token"] for s in open_corpus(data_cfg).manifest["splits"].values())
        if max_token >= vocab_size:
            raise DataError(f"token id {max_token} from data.tokenizer={data_cfg.tokenizer!r} is >= model "
                            f"vocab_size {vocab_size}")
    import grain

    local = batch_size // shard_count
    if split == "train":
        ds = grain.MapDataset.source(rows).shuffle(seed=_mix_seed(data_cfg.shuffle_seed, seed)).repeat()
    else:
        ds = grain.MapDataset.source(rows.padded_to(math.ceil(rows.num_rows / batch_size) * batch_size))
    # Local batches of consecutive rows; process i takes every n-th, i.e. block i of each global batch.
    ds = ds.batch(local, drop_remainder=True)[shard_index::shard_count].to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # rows are cheap: no reader threads
    if data_cfg.workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads an absl flag in mp_prefetch (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers))
    return iter(ds)
