"""The platform that `auto` backend choices are made for: the running JAX backend, or the target of a cross-lowering.

`jax.export.export(f, platforms=["cuda"])` traces `f` on this machine; inside `lowering_for("cuda")` the MoE and
attention `auto` choices (ragged all-to-all, cuDNN, ...) are the ones a GPU run makes, so the exported module is the
GPU program (tests/test_lowering.py).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("dsv3_jax_target_platform", default=None)


def platform() -> str:
    """`jax.default_backend()` ("cpu", "gpu", "tpu"), or the platform named by an enclosing `lowering_for`."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def lowering_for(name: str):
    """Backend choices made inside this block are those of platform `name` ("cuda", "tpu", ...)."""
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)
