"""Tokens/s and MFU of the trainer's jitted train step on the first device, for a preset with overrides.

    python benchmarks/train_step.py --config dsv3-16b model.num_hidden_layers=4 train.global_batch_size=8 \
        train.micro_batches=1 mesh.expert=1 [--steps 10] [--json]

MFU is taken twice: against the device's table peak (train/metrics.py) and against a bf16 matmul measured on the
same device in the same run (a square `jnp.dot`, the best a dense GEMM reaches there). The step is the one
`train.py` compiles (the model as configured, MTP included), on a synthetic batch of random tokens, from the
initial weights; the median of `--steps` timed steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from dsv3_jax.errors import ConfigError, print_error
from dsv3_jax.presets import load_config
from dsv3_jax.tools.train_call import our_train
from dsv3_jax.train.metrics import flops_per_token, peak_flops


def matmul_peak_flops(n: int, dtype=jnp.bfloat16, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (float32 accumulation) on the default device, median of `repeats`.
    Random operands: a GPU multiplies constant ones faster (train/metrics.measured_matmul_tflops, the CPU estimate,
    uses ones)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after two warm-up steps)")
    p.add_argument("--matmul", type=int, default=8192, help="side of the measured bf16 matmul (0: skip it)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        return print_error(e)
    t0 = time.perf_counter()
    one, _ = our_train(cfg)
    one()
    compile_s = time.perf_counter() - t0
    one()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / step_s
    table_peak, source = peak_flops(None, jax.devices()[:1])
    measured_peak = matmul_peak_flops(a.matmul) if a.matmul else float("nan")
    res = {"config": a.config, "overrides": a.overrides, "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "precision": cfg.impl.precision, "tokens_per_step": tokens,
           "first_call_s": round(compile_s, 2), "step_s_median": step_s, "step_s_min": min(times),
           "tokens_per_s": tokens / step_s, "model_tflops_per_s": flops / 1e12,
           "mfu_vs_table_peak": flops / table_peak, "table_peak_source": source,
           "bf16_matmul_tflops_measured": measured_peak / 1e12, "mfu_vs_measured_matmul": flops / measured_peak}
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
