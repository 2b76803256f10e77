"""Raw text sources, read piece by piece: `stdlib` or a glob of text / JSONL / Parquet / ArrayRecord files.

A source is cut into `Piece`s (a whole text file, a byte range of a JSONL file that starts and ends on a line
boundary, one Parquet row group, a range of ArrayRecord records) so that the prepare step can tokenise pieces in
parallel and never holds more than one piece of a file in memory. Reading the pieces of a source in order yields its
(key, text) documents in source order; a key is the path relative to the glob's base directory, plus `#<line>`
(JSONL, 1-based) or `#<record>` (Parquet, ArrayRecord, 0-based), so that the eval split, which hashes keys, does not
depend on how the source was cut.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterator
from typing import NamedTuple

from dsv3_jax.errors import DataError

FORMATS = ("auto", "text", "jsonl", "parquet", "arrayrecord")


_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
               ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord"}


_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


_BLOCK = 1 << 24  # bytes read at a time when scanning a JSONL file for line boundaries


class Piece(NamedTuple):
    """One independently readable part of a source file. `begin`/`end`: bytes (jsonl), row group (parquet, end
    unused), records (arrayrecord); `first`: the index of the piece's first document in its file."""

    fmt: str
    path: str
    key: str
    begin: int
    end: int
    first: int
    size: int  # approximate bytes, for grouping pieces into shards


def _require(module: str, package: str, fmt: str):
    """Import an optional reader, or fail naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"data.format {fmt} needs the `{package}` package (pip install {package})") from None


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: document keys are relative to it."""
    fixed = []
    for p in pathlib.Path(pattern).parts:
        if glob.has_magic(p):
            break
        fixed.append(p)
    base = os.path.join(*fixed) if fixed else "."
    return base if os.path.isdir(base) else os.path.dirname(base) or "."


def _format_of(path: str, fmt: str) -> str:
    return fmt if fmt != "auto" else _EXT_FORMAT.get(pathlib.Path(path).suffix.lower(), "text")


def source_files(source: str, fmt: str = "auto") -> list[tuple[str, str, str]]:
    """(path, key, format) of every file of the source, sorted by path."""
    if fmt not in FORMATS:
        raise DataError(f"data.format must be one of {list(FORMATS)}, got {fmt!r}")
    if source == "stdlib":
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(f for f in filenames if f.endswith(".py")):
                path = pathlib.Path(dirpath) / name
                out.append((str(path), "stdlib/" + path.relative_to(root).as_posix(), "text"))
        return out
    pattern = os.path.expanduser(source)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"data.source {source!r} matched no files (use 'stdlib' or a glob of local files)")
    base = _glob_base(pattern)
    return [(p, os.path.relpath(p, base).replace(os.sep, "/"), _format_of(p, fmt)) for p in paths]


def _jsonl_pieces(path: str, key: str, piece_bytes: int) -> Iterator[Piece]:
    """Byte ranges of about `piece_bytes` that end after a newline, with the line number each starts at."""
    size = os.path.getsize(path)
    begin, line = 0, 1
    with open(path, "rb") as f:
        while begin < size:
            f.seek(min(begin + piece_bytes, size))
            f.readline()
            end = min(f.tell(), size)
            f.seek(begin)
            lines, pos = 0, begin
            while pos < end:
                block = f.read(min(_BLOCK, end - pos))
                lines += block.count(b"\n")
                pos += len(block)
            yield Piece("jsonl", path, key, begin, end, line, end - begin)
            begin, line = end, line + lines


def pieces(files: list[tuple[str, str, str]], piece_bytes: int) -> list[Piece]:
    """Every file cut into pieces, in source order."""
    out = []
    for path, key, fmt in files:
        if fmt == "text":
            out.append(Piece("text", path, key, 0, 0, 0, os.path.getsize(path)))
        elif fmt == "jsonl":
            out += _jsonl_pieces(path, key, piece_bytes)
        elif fmt == "parquet":
            pf = _parquet_file(path)
            first = 0
            for g in range(pf.num_row_groups):
                meta = pf.metadata.row_group(g)
                out.append(Piece("parquet", path, key, g, g + 1, first, meta.total_byte_size))
                first += meta.num_rows
        else:
            reader = _arrayrecord_reader(path)
            n = reader.num_records()
            reader.close()
            per = max(1, n * piece_bytes // max(os.path.getsize(path), 1))
            out += [Piece("arrayrecord", path, key, a, min(a + per, n), a, os.path.getsize(path) * (min(a + per, n) - a)
                          // max(n, 1)) for a in range(0, n, per)]
    return out


def as_text(raw: bytes, where: str) -> str:
    """UTF-8 bytes as text; bytes that cannot be text (NUL bytes, or more than 1% that are not UTF-8) are a one-line
    DataError naming `where`, so a glob that also matches binary files fails instead of training on noise."""
    if b"\0" in raw:
        raise DataError(f"{where}: binary data (NUL bytes), not text; narrow data.source to text files")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if bad > max(8, len(raw) // 100):
        raise DataError(f"{where}: not UTF-8 text ({bad} of {len(raw)} bytes do not decode); narrow data.source "
                        "to text files")
    return text


def _field(record: dict, field: str, where: str) -> str | None:
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (data.text_field); keys: {sorted(record)[:10]}")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


def _read_jsonl(p: Piece, field: str) -> Iterator[tuple[int, str | None]]:
    with open(p.path, "rb") as f:
        f.seek(p.begin)
        data = f.read(p.end - p.begin)
    for lineno, raw in enumerate(data.split(b"\n"), p.first):
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p.path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{p.path}:{lineno}: expected a JSON object with field {field!r}")
        yield lineno, _field(record, field, f"{p.path}:{lineno}")


def _parquet_file(path: str):
    pq = _require("pyarrow.parquet", "pyarrow", "parquet")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001  (pyarrow raises several unrelated types for a bad file)
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def _read_parquet(p: Piece, field: str) -> Iterator[tuple[int, str | None]]:
    pf = _parquet_file(p.path)
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{p.path}: no column {field!r} (data.text_field); columns: {names[:10]}")
    column = pf.read_row_group(p.begin, columns=[field]).column(field).to_pylist()
    for i, value in enumerate(column, p.first):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{p.path}: column {field!r} holds {type(value).__name__}, not strings")
        yield i, value


def _arrayrecord_reader(path: str):
    module = _require("array_record.python.array_record_module", "array-record", "arrayrecord")
    try:
        return module.ArrayRecordReader(path)
    except Exception as e:  # noqa: BLE001  (the C++ reader raises RuntimeError/ValueError variants)
        raise DataError(f"{path}: not a readable ArrayRecord file ({str(e).splitlines()[0]})") from None


def _read_arrayrecord(p: Piece, field: str) -> Iterator[tuple[int, str | None]]:
    """Each record is UTF-8 text, or a JSON object (a record starting with '{' that parses) holding `field`."""
    reader = _arrayrecord_reader(p.path)
    try:
        records = reader.read(list(range(p.begin, p.end)))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{p.path}: not a readable ArrayRecord file ({str(e).splitlines()[0]})") from None
    finally:
        reader.close()
    for i, raw in enumerate(records, p.first):
        text = as_text(raw, f"{p.path}: record {i}")
        if text.lstrip().startswith("{"):
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                text = _field(record, field, f"{p.path}: record {i}")
        yield i, text


def read_piece(p: Piece, field: str) -> Iterator[tuple[str, str]]:
    """The non-empty (key, text) documents of one piece, in order."""
    if p.fmt == "text":
        # universal newlines, as open() in text mode reads them
        text = as_text(pathlib.Path(p.path).read_bytes(), p.path).replace("\r\n", "\n").replace("\r", "\n")
        if text:
            yield p.key, text
        return
    reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "arrayrecord": _read_arrayrecord}[p.fmt]
    for index, text in reader(p, field):
        if text:
            yield f"{p.key}#{index}", text
