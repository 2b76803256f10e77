"""Multi-host start-up selection, a pure function of flags and environment (no process group is started)."""

import pytest

from dsv3_jax.errors import ConfigError
from dsv3_jax.parallel.distributed import Startup, choose_startup

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, flags, tpu_vm, want", [
    ({}, {}, False, Startup("single")),
    ({}, {"coordinator": "h:1", "num_processes": 2, "process_id": 1}, False, Startup("explicit", "h:1", 2, 1)),
    ({"DSV3_COORDINATOR": "h:1", "DSV3_NUM_PROCESSES": "4", "DSV3_PROCESS_ID": "3"}, {}, False,
     Startup("explicit", "h:1", 4, 3)),
    ({"DSV3_COORDINATOR": "env:1", "DSV3_NUM_PROCESSES": "4", "DSV3_PROCESS_ID": "3"},
     {"coordinator": "flag:2", "process_id": 0}, False, Startup("explicit", "flag:2", 4, 0)),  # flags win
    ({}, {"coordinator": "h:1", "num_processes": 1, "process_id": 0}, False, Startup("single")),
    ({**SLURM, "DSV3_COORDINATOR": "h:1", "DSV3_NUM_PROCESSES": "2", "DSV3_PROCESS_ID": "0"}, {}, False,
     Startup("explicit", "h:1", 2, 0)),  # explicit wins over detection
    (SLURM, {}, False, Startup("auto")),
    ({**SLURM, "SLURM_NTASKS": "1"}, {}, False, Startup("single")),  # a one-task job
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, {}, False, Startup("single")),  # not srun
    ({}, {}, True, Startup("auto")),  # Cloud TPU VM: JAX reads the slice from the metadata server
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, {}, False, Startup("auto")),
    ({"TPU_WORKER_HOSTNAMES": "a"}, {}, False, Startup("single")),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "c:1"}, {}, False, Startup("auto")),
    ({"OMPI_MCA_orte_hnp_uri": "1;tcp://h:1", "OMPI_COMM_WORLD_SIZE": "2"}, {}, False, Startup("auto")),
])
def test_startup_selection(env, flags, tpu_vm, want):
    assert choose_startup(env, cloud_tpu_vm=tpu_vm, **flags) == want


@pytest.mark.parametrize("env, flags, match", [
    ({}, {"coordinator": "h:1"}, "need all of --coordinator"),
    ({"DSV3_NUM_PROCESSES": "2", "DSV3_PROCESS_ID": "0"}, {}, "need all of"),
    ({}, {"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "--process-id 2 is out of range"),
    ({"DSV3_COORDINATOR": "h:1", "DSV3_NUM_PROCESSES": "two", "DSV3_PROCESS_ID": "0"}, {}, "DSV3_NUM_PROCESSES"),
])
def test_bad_startup_is_one_line_error(env, flags, match):
    with pytest.raises(ConfigError, match=match) as e:
        choose_startup(env, **flags)
    assert "\n" not in str(e.value)
