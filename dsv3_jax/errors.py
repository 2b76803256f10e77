"""The error types every layer raises for bad input, and the one-line printer the command lines use.

Each message is one line naming the culprit (the config field, the file or key, the prompt), so a CLI can answer
bad input with `error: <message>` and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys


class ConfigError(ValueError):
    """A bad config value; the message is one line and names the field."""


def print_error(e: BaseException) -> int:
    """A command line's answer to bad input: `error: <the message on one line>` on stderr; the exit status 2."""
    print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
    return 2


class DataError(ValueError):
    """Bad data input (source, file, field, tokenizer, token id); the message is one line and names the culprit."""


class HFError(ValueError):
    """A checkpoint that cannot be read as DeepSeek-V3; the message is one line naming the file or key."""


class GenerateError(ValueError):
    """Bad generation input (prompt, budget, sampling setting); the message is one line naming the culprit."""


class MissingExtra(ImportError):
    """An optional dependency a tool needs is not installed; the message names the extra that brings it."""


def require(module: str, extra: str):
    """`module`, imported; a one-line MissingExtra naming `pip install 'dsv3_jax[extra]'` when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed; this tool needs the [{extra}] extra: "
                           f"pip install 'dsv3_jax[{extra}]' (from a checkout: pip install -e '.[{extra}]')") from None
