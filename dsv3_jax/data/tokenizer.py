"""Tokenizers: the default byte-level one (id = byte + 2) and a local HF `tokenizer.json` via `tokenizers`.

Both expose `encode(str) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`, plus
`encode_array(str) -> np.ndarray` (int32), the fast path the data pipeline uses. Encoding never adds special tokens;
the packer adds bos/eos around each document itself.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Iterable

import numpy as np

from dsv3_jax.data import atomic, sources
from dsv3_jax.errors import DataError


class Tokenizer:
    """The interface shared by every tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted by 2: id 0 is bos, id 1 is eos, ids 2..257 are the bytes 0..255 (vocab 258)."""

    OFFSET = 2

    def __init__(self):
        self.vocab_size, self.bos_id, self.eos_id = 256 + self.OFFSET, 0, 1

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.OFFSET

    def decode(self, ids: Iterable[int]) -> str:
        ids_n = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
        keep = ids_n[(ids_n >= self.OFFSET) & (ids_n < self.vocab_size)] - self.OFFSET
        return keep.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


_BOS_NAMES = ("<|begin▁of▁sentence|>", "<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>")


_EOS_NAMES = ("<|end▁of▁sentence|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")


def _special_name(value) -> str | None:
    """A tokenizer_config.json special token entry: a string or a dict with "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _load(tokenizers, p: pathlib.Path):
    """A tokenizers.Tokenizer from a file; a file that is not a tokenizer.json is one DataError saying so."""
    try:
        raw = json.loads(p.read_bytes())
    except (ValueError, OSError) as e:
        raise DataError(f"data.tokenizer: {p} is not a tokenizer.json (not JSON: {str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise DataError(f"data.tokenizer: {p} is not a tokenizer.json (no \"model\" entry; give the tokenizer.json "
                        "that tokenizers / transformers save, or 'byte')")
    try:
        return tokenizers.Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001  (the library raises a bare Exception on parse errors)
        raise DataError(f"data.tokenizer: {p} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


class HFTokenizer(Tokenizer):
    """A local HF `tokenizer.json`. bos/eos come from a sibling `tokenizer_config.json` when it names them,
    else from the file's special tokens with a conventional name; a missing bos falls back to eos (GPT-2 style)."""

    def __init__(self, path: str):
        try:
            import tokenizers  # optional dependency, only for this tokenizer
        except ImportError:
            raise DataError(f"data.tokenizer={path!r} needs the `tokenizers` package (pip install tokenizers)") \
                from None
        p = pathlib.Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"data.tokenizer: file {str(p)!r} does not exist (use 'byte' or a tokenizer.json path)")
        self._tok = _load(tokenizers, p)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = self._find_specials(p)
        self.sha256 = hashlib.sha256(p.read_bytes()).hexdigest()

    def _find_specials(self, p: pathlib.Path) -> tuple[int, int]:
        names = {"bos": None, "eos": None}
        cfg_path = p.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except json.JSONDecodeError:
                cfg = {}
            for k in names:
                names[k] = _special_name(cfg.get(f"{k}_token"))
        ids = {}
        for k, candidates in (("bos", _BOS_NAMES), ("eos", _EOS_NAMES)):
            for name in ([names[k]] if names[k] else []) + list(candidates):
                tid = self._tok.token_to_id(name)
                if tid is not None:
                    ids[k] = tid
                    break
        if "eos" not in ids:
            raise DataError(f"data.tokenizer: {p} has no eos token (looked for tokenizer_config.json eos_token and "
                            f"{', '.join(_EOS_NAMES)})")
        return ids.get("bos", ids["eos"]), ids["eos"]

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Parallel encoding (the Rust library uses its own threads)."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def identity(tok: Tokenizer) -> dict:
    """What makes token ids comparable: prepared data records it and refuses a different tokenizer."""
    ident = {"kind": "byte" if isinstance(tok, ByteTokenizer) else "tokenizer.json", "vocab_size": tok.vocab_size,
             "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    return ident if isinstance(tok, ByteTokenizer) else {**ident, "sha256": tok.sha256}


def make_tokenizer(spec: str = "byte") -> Tokenizer:
    """`"byte"` for the byte-level tokenizer, otherwise a path to an HF tokenizer.json (or its directory)."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"


def train_bpe(source: str, vocab_size: int, out: str, fmt: str = "auto", text_field: str = "text",
              max_documents: int | None = None) -> HFTokenizer:
    """Byte-level BPE (every byte is a base token, so any text encodes) trained on the documents of `source`,
    streamed piece by piece; bos/eos are added as special tokens. Returns the saved tokenizer, loaded back."""
    try:
        import tokenizers
    except ImportError:
        raise DataError("the BPE trainer needs the `tokenizers` package (pip install tokenizers)") from None

    base = len(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + 2
    if vocab_size < base:
        raise DataError(f"--vocab-size must be at least {base} (256 bytes + bos + eos), got {vocab_size}")
    files = sources.source_files(source, fmt)

    def texts():
        n = 0
        for piece in sources.pieces(files, 1 << 24):
            for _, text in sources.read_piece(piece, text_field):
                yield text
                n += 1
                if max_documents is not None and n >= max_documents:
                    return

    path = pathlib.Path(out).expanduser()
    if path.is_dir():
        raise DataError(f"--out {path} is a directory; name the tokenizer.json file to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"--out {path}: {parent} is a file, not a directory")
            break
    documents = 0

    def counted():
        nonlocal documents
        for text in texts():
            documents += 1
            yield text

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tok.train_from_iterator(counted(), trainer)
    if not documents:
        raise DataError(f"--source {source!r} holds no non-empty documents to train a tokenizer on")
    if tok.get_vocab_size(with_added_tokens=True) < vocab_size:
        raise DataError(f"--source {source!r} yields only {tok.get_vocab_size(with_added_tokens=True)} tokens, fewer "
                        f"than --vocab-size {vocab_size}: use more text or a smaller --vocab-size")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_with(path, lambda tmp: tok.save(str(tmp)))
    return HFTokenizer(str(path))
