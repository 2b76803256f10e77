"""Files written whole or not at all: a temporary file beside the target, then one rename.

An interrupted write (Ctrl-C, SIGKILL, a full disk) leaves the old file or none, never half of a new one; the hidden
temporary name (`.<name>.<pid>.tmp`) is removed when the write fails in this process.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable


def temporary(path: str | os.PathLike) -> pathlib.Path:
    """The hidden temporary name a write of `path` goes through."""
    p = pathlib.Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp")


def write_with(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """`write(tmp)` writes the content to a temporary path, which then replaces `path` in one rename."""
    path = pathlib.Path(path)
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))
