"""Multi-host start-up: `jax.distributed.initialize` from flags or environment, before any other JAX call.

Explicit: coordinator address, process count and process id (flags `--coordinator/--num-processes/--process-id`
or the environment variables DSV3_COORDINATOR, DSV3_NUM_PROCESSES, DSV3_PROCESS_ID). On TPU pods and under SLURM
JAX discovers all three itself, so `initialize()` is called with no arguments there. CPU processes talk over gloo.
"""

from __future__ import annotations

import os

import jax

from dsv3_jax.config import ConfigError


def _slurm_multi_task() -> bool:
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ


def _on_tpu_pod() -> bool:
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process JAX run when one is configured; returns whether `jax.distributed` was initialised."""
    coordinator = coordinator or os.environ.get("DSV3_COORDINATOR") or None
    if num_processes is None and os.environ.get("DSV3_NUM_PROCESSES"):
        num_processes = int(os.environ["DSV3_NUM_PROCESSES"])
    if process_id is None and os.environ.get("DSV3_PROCESS_ID"):
        process_id = int(os.environ["DSV3_PROCESS_ID"])
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("multi-process runs need all of --coordinator, --num-processes and --process-id "
                          "(or DSV3_COORDINATOR, DSV3_NUM_PROCESSES, DSV3_PROCESS_ID)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by multi-process CPU runs
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} is out of range for --num-processes {num_processes}")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if _slurm_multi_task() or _on_tpu_pod():
        jax.distributed.initialize()
        return True
    return False
