"""Fake CPU devices for planning: the planners (tools/plan.py, tools/plan_decode.py) compile for N devices."""

from __future__ import annotations

import os
import re
import sys

from dsv3_jax.errors import ConfigError


def use_fake_devices(n: int) -> None:
    """Make jax see `n` CPU devices: XLA reads XLA_FLAGS when its backends start, so set it before they do."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        import jax  # noqa: PLC0415
        from jax._src import xla_bridge  # noqa: PLC0415

        if xla_bridge.backends_are_initialized() and (jax.default_backend() != "cpu" or jax.device_count() != n):
            raise ConfigError(f"jax already started with {jax.device_count()} {jax.default_backend()} devices in "
                              f"this process; run `python -m dsv3_jax.tools.plan --devices {n} ...` in a fresh process")
