"""Train-step time of one preset under impl.precision fp32, bf16 and fp8 (same batch, same initial state), and the
bytes of every step's temporaries from XLA's compiled memory analysis. Prints median milliseconds and tokens/s.

    python benchmarks/bench_precision.py [--config small --repeats 7 key=value ...]
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.parallel.sharding import make_mesh
from dsv3_jax.presets import load_config
from dsv3_jax.train import state as train_state
from dsv3_jax.train.step import train_step


def batch_of(cfg) -> dict:
    """One global batch (B, T+1) of random tokens, one document per row."""
    b, t = cfg.train.global_batch_size, cfg.data.seq_len + 1
    tokens = np.random.default_rng(0).integers(2, cfg.model.vocab_size, (b, t)).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


def bench(preset: str, precision: str, overrides: list[str], repeats: int) -> tuple[float, float, float]:
    """(median step seconds, compile seconds, temp bytes) of the jitted train step."""
    cfg = load_config(preset, [f"impl.precision={precision}", *overrides])
    mesh = make_mesh(cfg.mesh)
    state, graphdef, tx = train_state.init_state(cfg, mesh)
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg))
    batch = batch_of(cfg)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        temp = compiled.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(compiled(state, batch))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(state, batch))
            times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s, temp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    print(f"backend={jax.default_backend()} preset={a.config} tokens/step={tokens} (median of {a.repeats} steps)")
    print(f"{'precision':10s} {'step ms':>9s} {'tokens/s':>9s} {'vs fp32':>8s} {'compile s':>10s} {'temp MiB':>9s}")
    base = None
    for precision in ("fp32", "bf16", "fp8"):
        sec, compile_s, temp = bench(a.config, precision, a.overrides, a.repeats)
        base = base or sec
        print(f"{precision:10s} {sec * 1e3:9.1f} {tokens / sec:9.0f} {sec / base:7.2f}x {compile_s:10.1f} "
              f"{temp / 2**20:9.1f}")


if __name__ == "__main__":
    main()
