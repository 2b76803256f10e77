"""Host memory policy for the CPU backend: keep freed memory for the next step instead of returning it to the OS.

XLA:CPU allocates one block for all of an executable's temporaries on every call (about 2 GB for the bench
config's train step) from one of its worker threads. glibc serves such a block from a fresh `mmap` and gives it
back with `munmap` on free, so every step touches every page of it anew: about 580K page faults, a quarter of the
step's CPU time on the 2-core bench machine. With one malloc arena (the main heap, which can grow past any size),
no `mmap` for large blocks and no trimming of the freed top of the heap, the second step finds the first step's
pages already mapped. The cost is that the process keeps its peak host memory until it exits, which a training or
sampling process does anyway.

This must run before JAX starts its CPU client: a worker thread picks its arena at its first allocation. The
command-line entry points call it first thing; other glibc settings (GLIBC_TUNABLES) given by the user win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


_INT_MAX = 2**31 - 1  # mallopt takes an int: freed heap tops up to 2 GB are kept, and 2 GB more is kept as pad


def reuse_freed_memory() -> bool:
    """Set the policy above; False (nothing changed) off glibc or when GLIBC_TUNABLES already sets malloc."""
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, _INT_MAX))
    return all([mallopt(p, v) == 1 for p, v in settings])
