"""Train a DeepSeek-V3-shaped model.

    python train.py                                   # configs/small.yaml on Python's own sources (CPU, ~10 min)
    python train.py --config configs/tiny.yaml train.steps=50 train.run_dir=runs/tiny
    python train.py --config small impl.remat=full mesh.fsdp=2 train.micro_batches=4

Resumes from the newest checkpoint in train.run_dir. Multi-host: pass --coordinator HOST:PORT --num-processes N
--process-id I (or DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID); on TPU pods and SLURM nothing is needed.
Bad input (config, data, shapes) prints `error: <reason>` and exits with status 2 before any checkpoint is touched.
"""

from __future__ import annotations

import argparse
import sys

from dsv3_jax.errors import ConfigError, print_error


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default="small", help="preset name (tiny, small, ...) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 for multi-process runs")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    return p.parse_args(argv)


def _usage_errors() -> tuple[type[Exception], ...]:
    """The exception types that mean bad input (printed as one line), not a bug."""
    from dsv3_jax.errors import DataError, GenerateError, HFError

    return ConfigError, DataError, HFError, GenerateError, FileNotFoundError


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from dsv3_jax.hostmem import reuse_freed_memory

    reuse_freed_memory()  # before JAX starts its CPU client
    try:
        from dsv3_jax.parallel import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        from dsv3_jax.presets import load_config
        from dsv3_jax.train.loop import train

        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except _usage_errors() as e:
        return print_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
