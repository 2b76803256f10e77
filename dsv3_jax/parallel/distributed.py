"""Multi-host start-up: `jax.distributed.initialize` before any other JAX call, chosen from flags and environment.

Explicit: coordinator address, process count and process id (flags `--coordinator/--num-processes/--process-id`
or DSV3_COORDINATOR, DSV3_NUM_PROCESSES, DSV3_PROCESS_ID). Where JAX's own cluster detection applies (Cloud TPU
VMs, TPU pods on GKE / multislice, SLURM jobs of several tasks, Open MPI launches) `initialize()` is called with no
arguments and JAX finds all three itself. Otherwise the run is one process. CPU processes talk over gloo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

from dsv3_jax.errors import ConfigError

_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class Startup(NamedTuple):
    kind: str  # "single" | "explicit" | "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "1") or 1)
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _hosts(value: str | None) -> int:
    return len([h for h in (value or "").split(",") if h.strip()])


def choose_startup(env: Mapping[str, str], coordinator: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, cloud_tpu_vm: bool = False) -> Startup:
    """How this process joins the run: a pure function of the flags, the environment and whether JAX found a
    Cloud TPU VM (`cloud_tpu_vm`). Flags win over DSV3_* variables; both win over detection."""
    coordinator = coordinator or env.get("DSV3_COORDINATOR") or None
    if num_processes is None and env.get("DSV3_NUM_PROCESSES"):
        num_processes = _int(env, "DSV3_NUM_PROCESSES")
    if process_id is None and env.get("DSV3_PROCESS_ID"):
        process_id = _int(env, "DSV3_PROCESS_ID")
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given):
        if not all(given):
            raise ConfigError("multi-process runs need all of --coordinator, --num-processes and --process-id "
                              "(or DSV3_COORDINATOR, DSV3_NUM_PROCESSES, DSV3_PROCESS_ID)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} is out of range for --num-processes {num_processes}")
        if num_processes == 1:
            return Startup("single")
        return Startup("explicit", coordinator, num_processes, process_id)
    slurm = all(k in env for k in _SLURM) and _int(env, "SLURM_NTASKS") > 1
    tpu_pod = bool(env.get("MEGASCALE_COORDINATOR_ADDRESS")) or max(
        _hosts(env.get("TPU_PROCESS_ADDRESSES")), _hosts(env.get("TPU_WORKER_HOSTNAMES"))) > 1
    mpi = "OMPI_MCA_orte_hnp_uri" in env and _int(env, "OMPI_COMM_WORLD_SIZE") > 1
    return Startup("auto") if slurm or tpu_pod or mpi or cloud_tpu_vm else Startup("single")


def _on_cloud_tpu_vm() -> bool:
    """JAX's own finding (libtpu present); False where the private module moved."""
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # noqa: PLC0415
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process JAX run when one is configured or detected; returns whether it was initialised."""
    import jax  # noqa: PLC0415

    start = choose_startup(os.environ, coordinator, num_processes, process_id, _on_cloud_tpu_vm())
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by multi-process CPU runs
    if start.kind == "explicit":
        jax.distributed.initialize(start.coordinator, start.num_processes, start.process_id)
    elif start.kind == "auto":
        jax.distributed.initialize()
    return start.kind != "single"
