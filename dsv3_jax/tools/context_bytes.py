"""Bytes each device sends per layer for context parallelism, read from the compiled train step.

    python -m dsv3_jax.tools.context_bytes --config deepseek-v3-671b --devices 8 --context 8 --seq-len 32768 \
        impl.precision=fp32 impl.dtype=float32

Compiles (never runs) the preset's train step with `--layers` dense layers, no MTP, one row, the sequence split over
`context` (the rest of the devices on `tensor`), and prints per collective that crosses `context` its link bytes per
device divided by the layers: the `context_parallel` ones are the scheme's (docs/long_context.md).
"""

from __future__ import annotations

import argparse
import collections
import sys

from dsv3_jax.errors import ArgumentParser, run_command
from dsv3_jax.presets import load_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m dsv3_jax.tools.context_bytes", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="deepseek-v3-671b")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def _main(argv: list[str]) -> int:
    from dsv3_jax.tools import plan

    a = parse_args(argv)
    cfg = load_config(a.config, [f"model.num_hidden_layers={a.layers}", f"model.first_k_dense_replace={a.layers}",
                                 "model.num_nextn_predict_layers=0", "mesh.data=1", "mesh.fsdp=1", "mesh.expert=1",
                                 f"mesh.tensor={a.devices // a.context}", f"mesh.context={a.context}", "mesh.rules={}",
                                 f"data.seq_len={a.seq_len}", "train.global_batch_size=1", "train.micro_batches=1",
                                 *a.overrides])
    plan.use_fake_devices(a.devices)
    import jax  # noqa: PLC0415

    from dsv3_jax.parallel.sharding import make_mesh, rules_for, use_rules
    from dsv3_jax.tools import hlo
    from dsv3_jax.train.step import jit_train_step

    mesh = make_mesh(cfg.mesh)
    with use_rules(rules_for(cfg.mesh)):
        state, batch, graphdef, tx = plan.abstract_inputs(cfg, mesh)
    step = jit_train_step(cfg, graphdef, tx, mesh, state)
    with jax.set_mesh(mesh), use_rules(rules_for(cfg.mesh)):
        text = step.lower(state, batch).compile({"xla_backend_optimization_level": 0}).as_text()
    per_layer = collections.defaultdict(float)
    for o in hlo.analyze(text, a.devices, None, mesh.device_ids, mesh.axis_names)["collective_ops"]:
        if "context" in o["axes"] and o["kind"] != "all-reduce":  # all-reduces: the weights' gradients
            where = "context_parallel" if "context_parallel" in o["op_name"] else "other"
            per_layer[(where, o["kind"], o["shape"])] += o["link_bytes"] / a.layers
    for (where, kind, shape), b in sorted(per_layer.items(), key=lambda kv: -kv[1]):
        print(f"{b / 2**20:10.2f} MiB/layer  {where:16s} {kind:15s} {shape}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
