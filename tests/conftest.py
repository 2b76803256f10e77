"""One persistent XLA compilation cache per test session, shared by the pytest-xdist workers and by every train.py /
sample.py / `python -c` subprocess the tests start (they inherit the environment): a program that one process
compiled is loaded, not compiled again, by the next process that builds the same program. Entries are keyed by the
HLO, the compile options, the backend and XLA_FLAGS, so a different device count or config never hits another's
entry. The directory is new per session and removed at its end: nothing carries over between runs.
DSV3_TEST_XLA_CACHE=0 runs the session without it (to measure what it saves).

XLA:CPU compiles the tests' programs with LLVM at -O0 (`--xla_backend_optimization_level=0` in XLA_FLAGS, inherited
like the cache; tests/xla_env.py keeps it when a test sets a device count). The HLO passes, the compiled HLO and its
memory and cost analysis are unchanged (only the machine-code generation is) and results agree to float32 rounding;
the tiny train step compiled in 14 s instead of 45 s here. DSV3_TEST_LLVM_O0=0 compiles at XLA's default level.
It also generates fusions with XLA:CPU's legacy emitter (`--xla_cpu_use_fusion_emitters=false`): the MLIR fusion
emitters compile each fusion through its own pipeline, about 2/3 of a train step's compile; the compiled HLO's
collectives are the same either way (checked on the six data-parallel programs), and about 1/3 the compile CPU."""

import os
import shutil
import sys
import tempfile

_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
_OWNER = "DSV3_TEST_CACHE_OWNER"  # the pid of the process that made the directory (the xdist controller or pytest)
_FAST_CODEGEN = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def pytest_configure(config):
    """Runs in the controller before the workers start (they inherit the variables) and again in each worker,
    where the directory already exists. Set before jax is imported, so jax reads them as its defaults."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("DSV3_TEST_LLVM_O0") != "0":
        os.environ["XLA_FLAGS"] = " ".join([*flags.split(), *(f for f in _FAST_CODEGEN if f not in flags.split())])
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


# Rough seconds each file's tests take in one worker (CPU seconds of the tests and their subprocesses on the 2-core
# machine): (full suite, `-m "not slow"`). xdist hands whole files to the workers in
# collection order (--dist loadfile --no-loadscope-reorder in pyproject.toml), so the longest go first: a long file
# that started last would run alone while the other worker idles (xdist's own order, most tests first, put the
# bench, experiments and multi-process files last). Files not listed take a few seconds and fill the gaps at the end.
FILE_SECONDS = {
    "test_ep.py": (300, 26), "test_checkpoint.py": (150, 3), "test_trainer.py": (130, 77), "test_bench.py": (115, 1),
    "test_sampling.py": (108, 61), "test_model.py": (106, 106), "test_experiments.py": (100, 1),
    "test_plan.py": (95, 30), "test_train_cli.py": (84, 44), "test_sharding.py": (76, 17), "test_balance.py": (66, 3),
    "test_attention.py": (66, 66), "test_multiprocess.py": (61, 0), "test_moe.py": (55, 55), "test_hf.py": (49, 23),
    "test_sample_cli.py": (44, 28), "test_counts.py": (36, 0), "test_precision.py": (33, 33),
    "test_bench_decode.py": (25, 0), "test_parity.py": (22, 20), "test_prepare.py": (9, 3),
    "test_data_parallel.py": (500, 10), "test_grad_accumulation.py": (150, 70),
    "test_long_context.py": (420, 1), "test_vocab_memory.py": (250, 15),
    "test_cli_faults.py": (154, 10),
    "test_ctrl_c.py": (149, 24), "test_context_extension.py": (105, 50), "test_loss_units.py": (86, 0),
    "test_plan_decode.py": (50, 2), "test_sharded_decode.py": (45, 20), "test_lowering.py": (45, 45),
    "test_peak.py": (1, 1),
}


def pytest_collection_modifyitems(config, items):
    column = 1 if "not slow" in (config.getoption("markexpr") or "") else 0
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, (0.0, 0.0))[column])  # stable: files stay whole
