"""Peak host memory of `hf.load(path, mesh=...)` per process (the sliced-load check of issue 9).

`python benchmarks/hf_load_memory.py make --out /tmp/hf400m` writes a random float32 checkpoint of about 400 MB
(2 MoE layers of 64 experts dominate it); `python benchmarks/hf_load_memory.py load /tmp/hf400m --processes 2`
loads it onto an (expert 8) mesh of 2 processes x 4 CPU devices and prints, per process, the resident memory
before the load, its peak during the load, the bytes of parameters its devices hold, and the tensor bytes it read.
"""

import argparse
import inspect
import json
import os
import resource
import socket
import subprocess
import sys


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def make(out: str) -> None:
    from flax import nnx

    from dsv3_jax.config import ModelConfig
    from dsv3_jax.interop import hf
    from dsv3_jax.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=3, first_k_dense_replace=1,
                      num_attention_heads=4, intermediate_size=1024, moe_intermediate_size=512, n_routed_experts=64,
                      n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=128,
                      kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                      num_nextn_predict_layers=0).validate()
    hf.save(Transformer(cfg, nnx.Rngs(0)), out, shard_size_mb=100)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{out}: {size / 2**20:.0f} MB")


def load_one(path: str, coordinator: str, pid: int, processes: int) -> None:
    from dsv3_jax.parallel import distributed

    distributed.initialize(coordinator, processes, pid)
    import jax
    from flax import nnx

    from dsv3_jax.config import MeshConfig
    from dsv3_jax.interop import hf
    from dsv3_jax.parallel.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=1, expert=8))
    jax.numpy.zeros(1).block_until_ready()
    before = _rss_mb()
    stats = {"bytes_read": float("nan")}
    sliced = "stats" in inspect.signature(hf.load).parameters  # False for the code before sliced loading
    model = hf.load(path, mesh=mesh, **({"stats": stats} if sliced else {}))
    held = sum(s.data.nbytes for _, v in nnx.to_flat_state(nnx.state(model))
               for s in v.get_value().addressable_shards)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"process": pid, "rss_before_mb": round(before), "peak_rss_mb": round(peak),
                      "held_mb": round(held / 2**20), "read_mb": stats["bytes_read"] / 2**20}), flush=True)


def load(path: str, processes: int) -> None:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, __file__, "_one", path, f"localhost:{port}", str(i), str(processes)],
                              env=env) for i in range(processes)]
    for p in procs:
        p.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["make", "load", "_one"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--out")
    parser.add_argument("--processes", type=int, default=2)
    a = parser.parse_args()
    if a.mode == "make":
        make(a.out)
    elif a.mode == "load":
        load(a.args[0], a.processes)
    else:
        load_one(a.args[0], a.args[1], int(a.args[2]), int(a.args[3]))
