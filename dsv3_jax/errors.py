"""The error types every layer raises for bad input, and the one error path every command line shares.

Each message is one line naming the culprit (the config field, the file or key, the prompt), so a command answers
bad input with `error: <message>` and exit status 2 instead of a traceback, and Ctrl-C with one line and status 130
(`run_command`). The classes live here and nowhere else: `python -m dsv3_jax.tools.x` runs its module as
`__main__`, so a class defined in a tool module would be a different class from the one the library raises.
"""

from __future__ import annotations

import _thread
import argparse
import importlib
import signal
import sys
import threading
import time
from collections.abc import Callable


class Error(Exception):
    """Bad input or a bad file, as opposed to a bug: the base of the package's error types (one-line messages)."""


class ConfigError(Error, ValueError):
    """A bad config value; the message is one line and names the field."""


class DataError(Error, ValueError):
    """Bad data input (source, file, field, tokenizer, token id); the message is one line and names the culprit."""


class HFError(Error, ValueError):
    """A checkpoint that cannot be read as DeepSeek-V3; the message is one line naming the file or key."""


class GenerateError(Error, ValueError):
    """Bad generation input (prompt, budget, sampling setting); the message is one line naming the culprit."""


class UsageError(Error, ValueError):
    """A bad command-line flag or combination of flags; the message is one line naming the flag."""


class MissingExtra(Error, ImportError):
    """An optional dependency a tool needs is not installed; the message names the extra that brings it."""


def require(module: str, extra: str):
    """`module`, imported; a one-line MissingExtra naming `pip install 'dsv3_jax[extra]'` when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed; this tool needs the [{extra}] extra: "
                           f"pip install 'dsv3_jax[{extra}]' (from a checkout: pip install -e '.[{extra}]')") from None


def one_line(e: BaseException) -> str:
    """An error's message on one line: an OSError as `<file>: <reason>`, anything else as its text."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename is not None else ""
        return f"{where}{e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def print_error(e: BaseException) -> int:
    """A command line's answer to bad input: `error: <the message on one line>` on stderr; the exit status 2."""
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    return 2


# What a command answers with one line: the package's errors, and files that are missing or of the wrong kind.
USER_ERRORS = (Error, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


INTERRUPTED = 130  # 128 + SIGINT, as shells report a process that Ctrl-C stopped


class _Interrupts:
    """Remembers a SIGINT even when the KeyboardInterrupt it raises is swallowed, so the command still stops with
    status 130 instead of finishing as if nothing happened. Python swallows an exception raised inside a garbage
    collection callback (JAX registers one), a finalizer or a weakref callback, reporting "Exception ignored in ..."
    with a traceback through sys.unraisablehook; `_Unraisable` drops that report and `redeliver`s the interrupt to
    the main thread a moment later (from another thread, so not inside the callback), where it stops the command."""

    def __init__(self):
        self.seen = self.active = False

    def handle(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def redeliver(self) -> None:
        def later():
            time.sleep(0.05)
            if self.active:  # not after the command has returned
                _thread.interrupt_main(signal.SIGINT)

        threading.Thread(target=later, daemon=True).start()


_INTERRUPTS = _Interrupts()


class _Unraisable:
    """sys.unraisablehook, installed once and kept to the end of the process (objects are finalised up to its
    exit): swallowed interrupts are re-delivered, reports that a layer declared noise (`quiet_unraisable`) dropped,
    everything else goes to the hook that was there before."""

    def __init__(self):
        self.quiet: list[Callable] = []
        self.previous, self.previous_excepthook = sys.unraisablehook, sys.excepthook

    def __call__(self, info):
        if _INTERRUPTS.seen and info.exc_type is KeyboardInterrupt:
            _INTERRUPTS.redeliver()
            return
        if any(q(info.exc_type, info.exc_value, info.object) for q in self.quiet):
            return
        self.previous(info)

    def excepthook(self, exc_type, exc_value, tb):
        """sys.excepthook, which C++ threads' Python callbacks print their failures through: the same quieting."""
        if any(q(exc_type, exc_value, None) for q in self.quiet):
            return
        self.previous_excepthook(exc_type, exc_value, tb)


_UNRAISABLE = _Unraisable()


def _install_unraisable_hook() -> None:
    if sys.unraisablehook is not _UNRAISABLE:
        _UNRAISABLE.previous, sys.unraisablehook = sys.unraisablehook, _UNRAISABLE


def quiet_unraisable(predicate: Callable) -> None:
    """Drop the "Exception ignored in ..." reports and the tracebacks of callbacks in foreign threads for which
    `predicate(exc_type, exc_value, obj)` holds (e.g. the asynchronous reads that a failed checkpoint restore
    abandons, each reported with a traceback when it finishes or is collected)."""
    if predicate not in _UNRAISABLE.quiet:
        _UNRAISABLE.quiet.append(predicate)
    _install_unraisable_hook()
    if sys.excepthook is not _UNRAISABLE.excepthook:
        _UNRAISABLE.previous_excepthook, sys.excepthook = sys.excepthook, _UNRAISABLE.excepthook


def interrupted() -> bool:
    """Whether Ctrl-C was pressed during the running command (the training loop then stops at its next step)."""
    return _INTERRUPTS.seen


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag raises UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_command(main: Callable[[], int | None]) -> int:
    """Run a command's body on the one error path: the package's errors and bad files print `error: <one line>`
    and return 2; Ctrl-C anywhere (start-up, compilation, a step, a write) prints `interrupted` and returns 130,
    also when the KeyboardInterrupt was swallowed on its way up. Anything else is a bug and keeps its traceback."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _INTERRUPTS.handle) if main_thread else None
    _INTERRUPTS.seen, _INTERRUPTS.active = False, True
    _install_unraisable_hook()
    try:
        code = main()
    except KeyboardInterrupt:
        code = None
        _INTERRUPTS.seen = True
    except USER_ERRORS as e:
        if not _INTERRUPTS.seen:
            return print_error(e)
        code = None
    finally:
        _INTERRUPTS.active = False
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    was_interrupted, _INTERRUPTS.seen = _INTERRUPTS.seen, False  # a later library call must not see this one
    if was_interrupted:
        print("interrupted (Ctrl-C); finished files are kept, unfinished ones were not written", file=sys.stderr,
              flush=True)
        return INTERRUPTED
    return int(code or 0)
