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


def script_results(script: str, tag: str, timeout: float, devices: int = 8) -> dict:
    """Run a test's check script in a fresh process on `devices` fake devices and return the JSON it printed on
    the line starting with `tag` (each check's "ok" or traceback); a crash or a missing line fails with its
    output."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(devices),
                       cwd=REPO, timeout=timeout)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith(tag + " ")), None)
    assert r.returncode == 0 and line, (r.stdout[-2000:], r.stderr[-4000:])
    return json.loads(line.removeprefix(tag + " "))
