"""Expert-parallel MoE (shard_map + all-to-all) against the GSPMD-partitioned grouped matmul: the real training step
of a preset on this machine's devices (fake CPU devices via XLA_FLAGS), one line per `impl.moe_impl`: compile
seconds, median step milliseconds, XLA's temporary bytes per device, and the compiled step's collectives.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_ep.py --config small \
        --impls ep_a2a,blocked mesh.data=2 mesh.expert=4
"""

import argparse
import collections
import functools
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.parallel.sharding import make_mesh, rules_for, use_rules
from dsv3_jax.presets import load_config
from dsv3_jax.train import state as train_state
from dsv3_jax.train.step import train_step

_COLLECTIVE = re.compile(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                         r"(?:-start)?\(")
_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """{kind: (count, result bytes)} over the compiled HLO text."""
    out = collections.defaultdict(lambda: [0, 0])
    for shapes, kind in _COLLECTIVE.findall(hlo):
        out[kind][0] += 1
        for dt, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", shapes):
            out[kind][1] += _DTYPE_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
    return {k: tuple(v) for k, v in sorted(out.items())}


def measure(cfg, repeats: int) -> dict:
    mesh = make_mesh(cfg.mesh)
    b, t = cfg.train.global_batch_size, cfg.data.seq_len
    with use_rules(rules_for(cfg.mesh)):
        state, graphdef, tx = train_state.init_state(cfg, mesh)
        rng = np.random.default_rng(0)
        batch = {"tokens": rng.integers(2, cfg.model.vocab_size, (b, t + 1)).astype(np.int32),
                 "segment_ids": np.ones((b, t + 1), np.int32),
                 "positions": np.tile(np.arange(t + 1, dtype=np.int32), (b, 1))}
        with jax.set_mesh(mesh):
            batch = jax.tree.map(jnp.asarray, batch)
            t0 = time.perf_counter()
            step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, cfg=cfg),
                           out_shardings=(jax.tree.map(lambda x: x.sharding, state),
                                          NamedSharding(mesh, PartitionSpec()))).lower(state, batch).compile()
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                state, m = step(state, batch)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
    mem = step.memory_analysis()
    return {"compile_s": compile_s, "step_ms": statistics.median(times) * 1e3,
            "temp_mib": mem.temp_size_in_bytes / 2**20, "loss": float(m["loss"]),
            "collectives": collectives(step.as_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--impls", default="ep_a2a,blocked")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    print(f"{jax.device_count()} {jax.default_backend()} devices, --config {a.config} {' '.join(a.overrides)}, "
          f"median of {a.repeats} steps")
    for impl in a.impls.split(","):
        r = measure(load_config(a.config, [*a.overrides, f"impl.moe_impl={impl}"]), a.repeats)
        coll = ", ".join(f"{k} {n} ({v / 2**20:.1f} MiB)" for k, (n, v) in r["collectives"].items())
        print(f"{impl:>10}: compile {r['compile_s']:.1f} s | step {r['step_ms']:.0f} ms | temp {r['temp_mib']:.1f} MiB"
              f"/device | loss {r['loss']:.4f} | {coll}", flush=True)


if __name__ == "__main__":
    main()
