"""The environment for a test's subprocess: the session's XLA flags (conftest.py: LLVM at -O0) plus, when asked,
a number of fake CPU devices, and the repository root on PYTHONPATH (scripts import tests/checks.py). Replacing
XLA_FLAGS instead would drop the session's flags, and with them the
compile-time saving and the shared compilation cache's key."""

import os
import pathlib
import re

REPO = str(pathlib.Path(__file__).resolve().parent.parent)

DEVICES_FLAG = "--xla_force_host_platform_device_count"


def env(devices: int | None = None, **extra: str) -> dict:
    """os.environ with `devices` fake CPU devices (None: XLA's default, one) and `extra` variables."""
    flags = re.sub(DEVICES_FLAG + r"=\d+", "", os.environ.get("XLA_FLAGS", "")).split()
    if devices:
        flags.append(f"{DEVICES_FLAG}={devices}")
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    e = {**os.environ, "XLA_FLAGS": " ".join(flags), "PYTHONPATH": path, **extra}
    if devices:
        e["JAX_PLATFORMS"] = "cpu"
    return e
