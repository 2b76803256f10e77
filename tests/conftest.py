"""One persistent XLA compilation cache per test session, shared by the pytest-xdist workers and by every train.py /
sample.py / `python -c` subprocess the tests start (they inherit the environment): a program that one process
compiled is loaded, not compiled again, by the next process that builds the same program. Entries are keyed by the
HLO, the compile options, the backend and XLA_FLAGS, so a different device count or config never hits another's
entry. The directory is new per session and removed at its end: nothing carries over between runs.
DSV3_TEST_XLA_CACHE=0 runs the session without it (to measure what it saves).

XLA:CPU compiles the tests' programs with LLVM at -O0 (`--xla_backend_optimization_level=0` in XLA_FLAGS, inherited
like the cache; tests/xla_env.py keeps it when a test sets a device count). The HLO passes, the compiled HLO and its
memory and cost analysis are unchanged (only the machine-code generation is) and results agree to float32 rounding;
the tiny train step compiled in 14 s instead of 45 s here. DSV3_TEST_LLVM_O0=0 compiles at XLA's default level."""

import os
import shutil
import sys
import tempfile

_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
_OWNER = "DSV3_TEST_CACHE_OWNER"  # the pid of the process that made the directory (the xdist controller or pytest)
_FAST_CODEGEN = "--xla_backend_optimization_level=0"


def pytest_configure(config):
    """Runs in the controller before the workers start (they inherit the variables) and again in each worker,
    where the directory already exists. Set before jax is imported, so jax reads them as its defaults."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("DSV3_TEST_LLVM_O0") != "0" and _FAST_CODEGEN not in flags.split():
        os.environ["XLA_FLAGS"] = f"{flags} {_FAST_CODEGEN}".strip()
    if os.environ.get("DSV3_TEST_XLA_CACHE") == "0":
        return
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsv3_jax_test_xla_cache_")
        os.environ[_OWNER] = str(os.getpid())
    for k, v in _CACHE_ENV.items():
        os.environ.setdefault(k, v)
    if "jax" not in sys.modules:  # jax reads the variables when it is imported
        return
    jax = sys.modules["jax"]
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ[
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(os.environ[
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
    if os.environ.get(_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

