"""Train a DeepSeek-V3-shaped model.

    python train.py                                   # configs/small.yaml on Python's own sources (CPU, ~10 min)
    python train.py --config configs/tiny.yaml train.steps=50 train.run_dir=runs/tiny
    python train.py --config small impl.remat=full mesh.fsdp=2 train.micro_batches=4

Resumes from the newest checkpoint in train.run_dir that restores (one that does not is set aside). A mesh with
more devices than this machine has fails; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python train.py --config tiny mesh.fsdp=2

Multi-host: pass --coordinator HOST:PORT --num-processes N --process-id I (or DSV3_COORDINATOR /
DSV3_NUM_PROCESSES / DSV3_PROCESS_ID); on TPU pods and SLURM nothing is needed. Bad input (config, data, shapes)
prints `error: <reason>` and exits with status 2 before any checkpoint is touched; Ctrl-C prints one line and exits
with status 130 (during training, after saving a checkpoint of the step in progress).
"""

from __future__ import annotations

import argparse
import sys

from dsv3_jax.errors import ArgumentParser, run_command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__)
    p.add_argument("--config", default="small", help="preset name (tiny, small, ...) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 for multi-process runs")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    from dsv3_jax.hostmem import reuse_freed_memory

    reuse_freed_memory()  # before JAX starts its CPU client
    from dsv3_jax.parallel import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from dsv3_jax.presets import load_config
    from dsv3_jax.train.loop import train

    train(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
