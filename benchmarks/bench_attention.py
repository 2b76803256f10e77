"""Attention backends side by side on one MLA layer (the `small` preset's shapes by default): XLA's compiled
temp memory and the median time of forward + backward at several sequence lengths, and the same for the whole
model's forward + backward (the training step's gradient) at one length.

    python benchmarks/bench_attention.py [--config small --lengths 512,2048,8192,32768 --backends dense,blocked
                                          --block 512 --repeats 5 --max-run-gib 4 --max-run-length 8192
                                          --model-length 2048]

Memory comes from `jit(...).lower(...).compile().memory_analysis()` (compiled, never run); a case is timed only
when its temp memory is under --max-run-gib and its length at most --max-run-length (dense at long lengths, and
anything at 32K on a small CPU, is compiled but not run).
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.model.mla import MLA
from dsv3_jax.model.rope import rope_cos_sin
from dsv3_jax.model.transformer import create
from dsv3_jax.presets import load_config


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_step(cfg, impl, t: int):
    """jit(grad) of one MLA layer's summed output w.r.t. its parameters and input, and its arguments."""
    graphdef, state = nnx.split(MLA(cfg, impl, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (1, t, cfg.hidden_size))
    pos = jnp.arange(t)[None]
    cos, sin = rope_cos_sin(pos, cfg)
    seg = jnp.ones((1, t), jnp.int32)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x, cos, sin, seg, pos)[0])

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (state, x)


def model_step(cfg, impl, t: int):
    """jit(grad) of the whole model's next-token loss w.r.t. its parameters (no MTP), and its arguments."""
    model = create(cfg, 0, impl=impl)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(2), (1, t + 1), 0, cfg.vocab_size)

    def loss(params, ids):
        logits = nnx.merge(graphdef, params, rest)(ids[:, :-1], mtp=False).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

    return jax.jit(jax.grad(loss)), (params, ids)


def measure(step_and_args, repeats: int, run: bool, max_run_bytes: float):
    step, args = step_and_args
    temp = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    ms = timed(step, *args, repeats=repeats) * 1e3 if run and temp <= max_run_bytes else None
    return temp, ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--lengths", default="512,2048,8192,32768")
    p.add_argument("--backends", default="dense,blocked")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-run-gib", type=float, default=4.0)
    p.add_argument("--max-run-length", type=int, default=8192)
    p.add_argument("--model-length", type=int, default=2048, help="0 skips the whole-model row")
    a = p.parse_args()
    full = load_config(a.config)
    lengths = [int(x) for x in a.lengths.split(",") if x]
    cfg = dataclasses.replace(full.model, max_position_embeddings=max(lengths + [a.model_length]))
    backends = a.backends.split(",")
    max_run = a.max_run_gib * 2**30
    print(f"platform={jax.default_backend()} config={a.config} heads={cfg.num_attention_heads} "
          f"qk={cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim} v={cfg.v_head_dim} block={a.block} batch=1 "
          f"(forward+backward, median of {a.repeats}; temp = XLA compiled temp bytes)")
    print(f"| {'what':14s} | {'T':>6s} | " + " | ".join(f"{b + ' temp':>14s} | {b + ' ms':>11s}" for b in backends)
          + " |")
    print("|" + "---|" * (2 + 2 * len(backends)))

    def row(label, t, make):
        cells = []
        for b in backends:
            impl = dataclasses.replace(full.impl, attention=b, attention_block_size=a.block)
            temp, ms = measure(make(cfg, impl, t), a.repeats, t <= a.max_run_length, max_run)
            cells.append(f"{temp / 2**20:11.1f} MiB | {'not run' if ms is None else f'{ms:8.1f} ms':>11s}")
        print(f"| {label:14s} | {t:6d} | " + " | ".join(cells) + " |", flush=True)

    for t in lengths:
        row("MLA layer", t, layer_step)
    if a.model_length:
        row(f"{a.config} model", a.model_length, model_step)


if __name__ == "__main__":
    main()
