"""hostmem.reuse_freed_memory: a jitted call with a large temporary stops page-faulting its temporary anew on every
call (the CPU train step's ~580K faults per step). Page faults are counted, not timed; each case runs in its own
process because the policy must be set before JAX starts its CPU client."""

import json
import subprocess
import sys

import pytest

_PROBE = r"""
import json, resource, sys
if sys.argv[1] == "on":
    from dsv3_jax.hostmem import reuse_freed_memory
    assert reuse_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(u, v):  # u @ v is a (4096, 4096) float32 temporary (64 MiB): a matmul's output, then a matmul's input
    return ((u @ v) @ v.T).sum()

u, v = jnp.ones((4096, 32)), jnp.ones((32, 4096))
for _ in range(3):
    f(u, v).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(u, v).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5))
"""
_TEMP_PAGES = 4096 * 4096 * 4 // 4096  # pages of one 64 MiB temporary


def _faults_per_call(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=300,
                         env={"PATH": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ":".join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy")
def test_freed_temporaries_are_reused_not_faulted_in_again():
    default, reused = _faults_per_call("off"), _faults_per_call("on")
    assert default > 0.8 * _TEMP_PAGES, default  # the probe does exercise the fresh-mmap path
    assert reused < 0.1 * _TEMP_PAGES, reused
