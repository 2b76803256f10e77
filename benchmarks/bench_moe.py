"""Grouped-matmul MoE backends side by side: blocked (portable), ragged_dot, dense-all-experts, and one dense
matmul of the same useful FLOPs as the floor. Prints median milliseconds (forward + backward) and ratios.

    python benchmarks/bench_moe.py [--tokens 8192 --experts 16 --k 2 --dim 256 --ffn 256 --block 64 --repeats 7]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from dsv3_jax.kernels.precision import Policy
from dsv3_jax.model import moe_backends as moe


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("tokens", 8192), ("experts", 16), ("k", 2), ("dim", 256), ("ffn", 256), ("block", 64),
                          ("repeats", 7)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (a.tokens, a.dim))
    w1 = jax.random.normal(keys[1], (a.experts, a.dim, a.ffn)) * 0.05
    w2 = jax.random.normal(keys[2], (a.experts, a.dim, a.ffn)) * 0.05
    w3 = jax.random.normal(keys[3], (a.experts, a.ffn, a.dim)) * 0.05
    router = jax.random.normal(keys[4], (a.dim, a.experts))
    _, idx = jax.lax.top_k(x @ router, a.k)
    gates = jnp.full((a.tokens, a.k), 1.0 / a.k)

    def step(impl):
        def loss(x, w1, w2, w3, idx, gates):  # routing passed in, as in the model (never a folded constant)
            return moe.grouped_ffn(x, idx, gates, w1, w2, w3, impl, a.block, Policy()).sum()

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

    rows = a.tokens * a.k
    xs = jax.random.normal(keys[5], (rows, a.dim))

    def useful(x, w1, w2, w3):  # the same FLOPs as the routed work, as three plain matmuls
        def loss(x, a_, b_, c_):
            return ((jax.nn.silu(x @ a_) * (x @ b_)) @ c_).sum()

        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w1[0], w2[0], w3[0])

    floor = timed(jax.jit(useful), xs, w1, w2, w3, repeats=a.repeats)
    print(f"backend={jax.default_backend()} tokens={a.tokens} experts={a.experts} k={a.k} dim={a.dim} "
          f"ffn={a.ffn} block={a.block} (median of {a.repeats}, forward+backward)")
    print(f"{'dense matmul, same useful FLOPs':34s} {floor:9.1f} ms   1.00x")
    for impl in ("blocked", "ragged_dot", "dense"):
        ms = timed(step(impl), x, w1, w2, w3, idx, gates, repeats=a.repeats)
        print(f"{impl:34s} {ms:9.1f} ms  {ms / floor:5.2f}x")


if __name__ == "__main__":
    main()
