"""Dry-run planner: compile the real training step for N devices on N fake CPU devices and read what XLA reports.

    python -m dsv3_jax.tools.plan --config deepseek-v3-671b --devices 256 train.micro_batches=60
    python -m dsv3_jax.tools.plan --config dsv3-16b --devices 8 mesh.fsdp=8 mesh.data=1 --hardware H100
    python -m dsv3_jax.tools.plan --config dsv3-16b --devices 8 --hardware H100 --search

Nothing is allocated: the TrainState is ShapeDtypeStructs carrying the shardings the trainer would create, the batch
likewise, and `train_step` is lowered and compiled exactly as `loop.train` jits it (state donated). Per
device it prints the parameter and optimizer-state bytes (from the shardings), XLA's temporaries (compiled memory
analysis), FLOPs (matmuls in the compiled HLO, every loop weighted by its trip count, beside XLA's cost analysis and
the analytic 6N + attention count), every collective with its count and bytes, the compile time and whether it fits.
Bad input prints `error: <reason>` on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import sys
import tempfile
import time

from dsv3_jax.config import Config, MeshConfig
from dsv3_jax.errors import ArgumentParser, ConfigError, run_command
from dsv3_jax.tools import hardware
from dsv3_jax.tools.fake_devices import use_fake_devices  # noqa: F401  (plan.use_fake_devices: tools/context_bytes.py)

# jax and the model (presets, traffic) load inside the functions that use them: `python -m dsv3_jax.tools.plan`
# imports this module before `main` installs the error path, and Ctrl-C during an import of jax would be a
# traceback, or be lost in jax's gc callback

GIB = 2**30


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m dsv3_jax.tools.plan", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default="small", help="preset name or YAML file")
    p.add_argument("--devices", type=int, required=True, help="number of devices to plan for (faked on CPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. mesh.expert=8")
    p.add_argument("--hbm-gib", type=float, help="device memory in GiB (default: the --hardware's HBM, else 80)")
    p.add_argument("--hardware", help=f"roofline estimate for one of: {', '.join(hardware.TABLE)}")
    p.add_argument("--seq-len", type=int, nargs="+", help="plan each of these data.seq_len values in turn")
    p.add_argument("--search", action="store_true", help="try the meshes that divide --devices, rank those that fit")
    p.add_argument("--max-compiles", type=int, default=8, help="--search compiles at most this many meshes")
    p.add_argument("--require-fit", action="store_true", help="exit with an error when the step does not fit")
    p.add_argument("--json", action="store_true", help="print one JSON object per plan instead of the table")
    p.add_argument("--mode", choices=["train", "decode"], default="train",
                   help="decode: the sampling plan (tools/plan_decode.py; --mode decode --help for its flags)")
    return p.parse_intermixed_args(argv)


def check_mesh(cfg: Config, n_devices: int, seq_lens: list[int] | None = None) -> None:
    """Mesh vs device count and the axes the model and the sequence (each of `seq_lens`, default data.seq_len)
    must divide, as one-line errors naming the fields."""
    m, model = cfg.mesh, cfg.model
    sizes = {"data": m.data, "fsdp": m.fsdp, "expert": m.expert, "context": m.context, "tensor": m.tensor}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if list(sizes.values()).count(-1) == 1 and n_devices % fixed == 0:
        sizes[next(k for k, v in sizes.items() if v == -1)] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices or -1 in sizes.values():
        raise ConfigError(f"mesh {sizes} has {math.prod(abs(s) for s in sizes.values())} devices, --devices is "
                          f"{n_devices}")
    if model.n_routed_experts % sizes["expert"]:
        raise ConfigError(f"model.n_routed_experts ({model.n_routed_experts}) is not divisible by mesh.expert "
                          f"({sizes['expert']})")
    if model.num_attention_heads % sizes["tensor"]:
        raise ConfigError(f"model.num_attention_heads ({model.num_attention_heads}) is not divisible by mesh.tensor "
                          f"({sizes['tensor']})")
    for t in seq_lens or [cfg.data.seq_len]:
        if not splits_sequence(t, sizes["context"], cfg.impl.attention_block_size):
            raise ConfigError(f"data.seq_len ({t}) is not divisible by mesh.context x impl.attention_block_size "
                              f"({sizes['context']} x {cfg.impl.attention_block_size}): each context rank holds "
                              "whole attention blocks")


def splits_sequence(seq_len: int, context: int, block: int) -> bool:
    """Whether `context` ranks split `seq_len` tokens into equal chunks of whole attention blocks (a chunk of at
    most one block is one block: nothing is padded either way)."""
    return seq_len % context == 0 and (seq_len // context <= block or seq_len % (context * block) == 0)


def candidate_meshes(cfg: Config, n: int, max_tensor: int = 8) -> list[MeshConfig]:
    """(data, fsdp, expert, context, tensor) with product n that the model, batch and sequence divide; tensor
    stays inside a node. `context` stays 1 unless the config splits the sequence (mesh.context > 1, or -1 for any
    size): then every size > 1 whose chunks are whole attention blocks (`splits_sequence`). Each keeps the
    config's `mesh.rules` (a preset's sharding strategy is part of what is planned)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    block, seq = cfg.impl.attention_block_size, cfg.data.seq_len
    contexts = [1] if cfg.mesh.context == 1 else [c for c in divisors if c > 1 and splits_sequence(seq, c, block)]
    out = []
    for context, tensor, expert, fsdp in itertools.product(contexts, divisors, divisors, divisors):
        if n % (context * tensor * expert * fsdp) or tensor > max_tensor:
            continue
        data = n // (context * tensor * expert * fsdp)
        mesh = MeshConfig(data=data, fsdp=fsdp, expert=expert, context=context, tensor=tensor, rules=cfg.mesh.rules)
        batch = cfg.train.global_batch_size // cfg.train.micro_batches
        if (cfg.model.n_routed_experts % expert or cfg.model.num_attention_heads % tensor
                or batch % (data * fsdp * expert)):
            continue
        out.append(mesh)
    return out


def shard_bytes(tree) -> int:
    """Bytes of the largest shard of every ShapeDtypeStruct in `tree` (one device's share)."""
    import jax  # noqa: PLC0415

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract_inputs(cfg: Config, mesh):
    """(TrainState of ShapeDtypeStructs with the trainer's shardings, batch likewise, graphdef, optimizer)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415

    from dsv3_jax.parallel.sharding import logical_spec
    from dsv3_jax.train.state import abstract_state
    from dsv3_jax.train.step import BATCH_KEYS

    state, graphdef, tx = abstract_state(cfg, mesh)
    rows = NamedSharding(mesh, logical_spec(("batch",)))
    shape = (cfg.train.global_batch_size, cfg.data.seq_len + 1)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for k in BATCH_KEYS}
    return state, batch, graphdef, tx


@contextlib.contextmanager
def captured_stderr(lines: list[str]):
    """Collect what XLA's C++ side writes to fd 2 while compiling (thousands of sharding warnings on big meshes):
    the planner counts them instead of streaming them; on an exception they are written back."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text = f.read().decode(errors="replace")
            lines.extend(text.splitlines())
            if failed:
                sys.stderr.write(text)


def plan(cfg: Config, mesh, hbm_bytes: float, hw: hardware.Hardware | None = None) -> dict:
    """Compile the training step of `cfg` on `mesh` (abstract inputs) and report per-device memory, work, time."""
    import jax  # noqa: PLC0415

    from dsv3_jax.parallel.sharding import logical_size, mesh_axes, mesh_size, rules_for, use_rules
    from dsv3_jax.tools import hlo, traffic
    from dsv3_jax.train import loop, metrics
    from dsv3_jax.train.step import jit_train_step

    loop.check_run(cfg, mesh)
    n = mesh.size
    t0, c0 = time.perf_counter(), time.process_time()
    log: list[str] = []
    with use_rules(rules_for(cfg.mesh)), captured_stderr(log):
        state, batch, graphdef, tx = abstract_inputs(cfg, mesh)
    step = jit_train_step(cfg, graphdef, tx, mesh, state)
    with jax.set_mesh(mesh), use_rules(rules_for(cfg.mesh)), captured_stderr(log):
        lowered = step.lower(state, batch)
        t1, c1 = time.perf_counter(), time.process_time()
        # backend optimisation only speeds up the CPU code we never run; buffer assignment is the same without it
        compiled = lowered.compile({"xla_backend_optimization_level": 0})
    t2, c2 = time.perf_counter(), time.process_time()
    remat = sum("Involuntary full rematerialization" in line for line in log)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    work = hlo.analyze(compiled.as_text(), n, hw.node if hw else None, mesh.device_ids, mesh.axis_names)
    ops = [as_ragged(op, cfg.impl.moe_capacity_factor) for op in work["collective_ops"]]
    collectives = hlo.summarize(ops)
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    analytic = metrics.flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    params_bytes, opt_bytes = shard_bytes(state.params), shard_bytes(state.opt_state)
    rules = rules_for(cfg.mesh)
    experts = mesh_axes("experts", rules)
    experts_split = mesh_size(mesh, experts + tuple(a for a in mesh_axes("expert_mlp", rules) if a not in experts))
    hbm_model = traffic.step_traffic(cfg, logical_size(mesh, "heads", rules), experts_split,
                                     logical_size(mesh, "batch", rules), params_bytes, opt_bytes)
    out = {
        "config": {"model_layers": cfg.model.num_hidden_layers, "seq_len": cfg.data.seq_len,
                   "global_batch_size": cfg.train.global_batch_size, "micro_batches": cfg.train.micro_batches,
                   "remat": cfg.impl.remat, "precision": cfg.impl.precision},
        "devices": n,
        "mesh": dict(mesh.shape),
        "rows_per_device": cfg.train.global_batch_size // logical_size(mesh, "batch", rules),
        "tokens_per_step": tokens,
        "bytes_per_device": {
            "params": params_bytes, "opt_state": opt_bytes,
            "other_state": shard_bytes((state.step, state.bias)), "batch": shard_bytes(batch),
            "arguments": mem.argument_size_in_bytes, "temp": mem.temp_size_in_bytes,
            "outputs_not_aliased": mem.output_size_in_bytes - mem.alias_size_in_bytes, "total": total,
        },
        "hbm_bytes": hbm_bytes,
        "fits": total <= hbm_bytes,
        "flops_per_step": {"compiled_matmul_per_device": work["dot_flops"],
                           "xla_cost_analysis_per_device": cost.get("flops", math.nan),
                           "analytic_per_device": analytic / n, "analytic_total": analytic},
        "hbm_traffic_per_device": {"model": hbm_model, "compiled_unfused": work["hbm_traffic"]},
        "collectives": collectives,
        "collectives_compiled": work["collectives"],  # the dense exchange stand-in as compiled
        "link_bytes_by_axes": hlo.by_axes(ops),
        "largest_collectives": sorted(ops, key=lambda o: -o["bytes"])[:8],
        "loop_trip_counts": work["loop_trip_counts"],
        "loops_of_unknown_length": work["loops_of_unknown_length"],
        "xla_warnings": {"involuntary_full_rematerialization": remat,
                         "other": [line for line in log if "Involuntary full rematerialization" not in line][:20]},
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "lower_cpu_s": c1 - c0,  # CPU seconds of this process: the wall times above include waiting for a core
        "compile_cpu_s": c2 - c1,
    }
    if hw is not None:
        inter = sum(c["inter_node_link_bytes"] for c in collectives.values())
        intra = sum(c["link_bytes"] for c in collectives.values()) - inter
        # loops of data-dependent length (used expert blocks, causal key blocks) count once in the compiled FLOPs:
        # the model's own FLOPs bound the matmul time from below
        est = hardware.roofline(hw, cfg.impl.precision, max(work["dot_flops"], analytic / n), hbm_model["total"],
                                intra, inter)
        est["hardware"] = hw.name
        for key, s in (("", est["step_s"]), ("serial_", est["serial_step_s"])):
            est[f"{key}tokens_per_s_per_device"] = tokens / n / s
            # MFU against the bf16 peak (DeepSeek's and MaxText's convention, also for fp8 runs)
            est[f"{key}mfu"] = analytic / n / s / hw.bf16_flops
        out["estimate"] = est
    return out


def as_ragged(op: dict, capacity_factor: float | None) -> dict:
    """A collective of the dense expert-parallel exchange (CPU's stand-in for `ragged_all_to_all`) counted at the
    bytes the ragged exchange moves under balanced routing (`expected_fill` of its buffers); others unchanged."""
    from dsv3_jax.parallel.expert_parallel import DENSE_EXCHANGE, expected_fill  # noqa: PLC0415

    if op["kind"] != "all-to-all" or DENSE_EXCHANGE not in op["op_name"]:
        return op
    fill = expected_fill(op["group"], capacity_factor)
    scaled = {k: op[k] * fill for k in ("bytes", "link_bytes", "inter_node_link_bytes")}
    return {**op, **scaled, "kind": "ragged-all-to-all (expected)"}


def _gib(b: float) -> str:
    return f"{b / GIB:,.2f}"


def _size(b: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:,.2f} {unit}"
    return f"{b:,.0f} B"


def format_plan(p: dict) -> str:
    b, f, c = p["bytes_per_device"], p["flops_per_step"], p["config"]
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [
        f"mesh {mesh} on {p['devices']} devices; {c['global_batch_size']} x {c['seq_len']} tokens per step, "
        f"{p['rows_per_device']} rows per device in {c['micro_batches']} micro-batch(es); remat {c['remat']}, "
        f"precision {c['precision']}, {c['model_layers']} layers",
        "per device",
        f"  parameters                 {_size(b['params']):>14}",
        f"  optimizer state            {_size(b['opt_state']):>14}",
        f"  router bias, step          {_size(b['other_state']):>14}",
        f"  batch                      {_size(b['batch']):>14}",
        f"  temporaries (XLA)          {_size(b['temp']):>14}",
        f"  outputs not aliased        {_size(b['outputs_not_aliased']):>14}",
        f"  total                      {_size(b['total']):>14}   "
        + ("fits" if p["fits"] else "does not fit") + f" in {_size(p['hbm_bytes'])}",
        f"FLOPs per step per device: {f['compiled_matmul_per_device']:.3e} compiled matmuls (loops x trip counts "
        f"{p['loop_trip_counts']}; {p['loops_of_unknown_length']} loops of data-dependent length counted once), "
        f"{f['xla_cost_analysis_per_device']:.3e} XLA cost analysis (loop bodies once), "
        f"{f['analytic_per_device']:.3e} analytic 6N + attention; the roofline takes the larger",
        "HBM traffic per device per step: {} analytic model (weights {}, activations {}, attention K/V {}, "
        "optimizer {}); {} compiled CPU HLO (unfused ops; slices as read)".format(
            *(_size(h[k]) for h in [p["hbm_traffic_per_device"]["model"]]
              for k in ("total", "weights", "activations", "attention_kv", "optimizer")),
            _size(p["hbm_traffic_per_device"]["compiled_unfused"])),
        "collectives per device per step    count        result          sent    sent across nodes",
    ]
    for kind, v in sorted(p["collectives"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {kind:<26} {v['count']:>9} {_size(v['bytes']):>13} {_size(v['link_bytes']):>13} "
                     f"{_size(v['inter_node_link_bytes']):>20}")
    if not p["collectives"]:
        lines.append("  (none)")
    stand_in = p["collectives_compiled"].get("all-to-all", {}).get("link_bytes", 0)
    if "ragged-all-to-all (expected)" in p["collectives"]:
        lines.append(f"  (the expert exchange compiles on CPU as a dense all-to-all that sends {_size(stand_in)}; "
                     "counted at the ragged exchange's bytes under balanced routing)")
    lines.append("  sent per mesh axes: " + ", ".join(
        f"{axes} {_size(v['link_bytes'])} ({_size(v['inter_node_link_bytes'])} across nodes)"
        for axes, v in sorted(p["link_bytes_by_axes"].items(), key=lambda kv: -kv[1]["link_bytes"])))
    for big in p["largest_collectives"][:3]:
        shape = big["shape"] if len(big["shape"]) < 60 else big["shape"][:56] + " ..."
        lines.append(f"  largest: {big['kind']} {shape} x{big['times']} over {big['group']} devices "
                     f"({_size(big['bytes'])}) from {big['op_name'][-90:]}")
    w = p["xla_warnings"]
    if w["involuntary_full_rematerialization"]:
        lines.append(f"XLA warned {w['involuntary_full_rematerialization']} times: \"Involuntary full "
                     "rematerialization\" (a tensor replicated on every device to change its sharding)")
    lines.append(f"compile: trace + lower {p['lower_s']:.1f} s, compile {p['compile_s']:.1f} s (CPU time "
                 f"{p['lower_cpu_s']:.1f} s + {p['compile_cpu_s']:.1f} s)")
    if "estimate" in p:
        e = p["estimate"]
        lines.append(f"roofline on {e['hardware']}: compute {e['compute_s']:.3g} s, memory {e['memory_s']:.3g} s "
                     f"(analytic), links {e['intra_link_s']:.3g} s inside the node + {e['inter_link_s']:.3g} s "
                     "across nodes per step")
        lines.append(f"  overlapped (max, {e['bound']} bound): step {e['step_s']:.3g} s, "
                     f"{e['tokens_per_s_per_device']:,.0f} tokens/s per device, MFU {100 * e['mfu']:.1f}%")
        lines.append(f"  serial (sum):                step {e['serial_step_s']:.3g} s, "
                     f"{e['serial_tokens_per_s_per_device']:,.0f} tokens/s per device, "
                     f"MFU {100 * e['serial_mfu']:.1f}%")
    return "\n".join(lines)


def _mesh_str(m: MeshConfig) -> str:
    return f"data={m.data} fsdp={m.fsdp} expert={m.expert} " + (f"context={m.context} " if m.context > 1 else "") + \
        f"tensor={m.tensor}"


def search(cfg: Config, n: int, hbm_bytes: float, hw, max_compiles: int, emit) -> list[dict]:
    """Compile the candidate meshes whose state fits, best first by state size; rank those that fit."""
    import dataclasses  # noqa: PLC0415

    from dsv3_jax.parallel.sharding import make_mesh

    t0 = time.perf_counter()
    cands = candidate_meshes(cfg, n, hw.node if hw and hw.node < n else 8)
    sized = []
    for m in cands:  # parameter + optimizer bytes from the shardings alone: no compile needed to rule a mesh out
        with captured_stderr([]):
            state, batch, _, _ = abstract_inputs(dataclasses.replace(cfg, mesh=m), make_mesh(m))
        sized.append((shard_bytes(state) + shard_bytes(batch), m))
    sized.sort(key=lambda s: s[0])
    results, pruned = [], 0
    for state_bytes, m in sized:
        if state_bytes > hbm_bytes:
            pruned += 1
            emit(f"  {_mesh_str(m)}: does not fit: state alone {_gib(state_bytes)} GiB > {_gib(hbm_bytes)} GiB")
            continue
        if len(results) == max_compiles:
            emit(f"  {_mesh_str(m)}: not compiled (--max-compiles {max_compiles})")
            continue
        p = plan(dataclasses.replace(cfg, mesh=m), make_mesh(m), hbm_bytes, hw)
        results.append(p)
        verdict = "fits" if p["fits"] else f"does not fit: {_gib(p['bytes_per_device']['total'])} GiB > " \
                                           f"{_gib(hbm_bytes)} GiB"
        emit(f"  {_mesh_str(m)}: {verdict} (compiled in {p['compile_s']:.1f} s)")
    fit = [p for p in results if p["fits"]]
    key = (lambda p: p["estimate"]["step_s"]) if hw else (lambda p: p["bytes_per_device"]["total"])
    fit.sort(key=key)
    emit(f"search: {len(cands)} meshes divide {n} devices and the model; {pruned} ruled out by state size, "
         f"{len(results)} compiled in {time.perf_counter() - t0:.0f} s, {len(fit)} fit")
    return fit


def format_ranking(fit: list[dict]) -> str:
    lines = ["rank  mesh (data fsdp expert context tensor)  total GiB   step s  bound         tokens/s/dev    MFU"]
    for i, p in enumerate(fit, 1):
        m, e = p["mesh"], p.get("estimate", {})
        mesh = f"{m['data']:>4} {m['fsdp']:>4} {m['expert']:>6} {m.get('context', 1):>7} {m['tensor']:>6}"
        est = (f"{e['step_s']:>8.3g}  {e['bound']:<12} {e['tokens_per_s_per_device']:>12,.0f} {100 * e['mfu']:>6.1f}%"
               if e else "       -  -")
        lines.append(f"{i:>4}  {mesh:<37} {_gib(p['bytes_per_device']['total']):>11} {est}")
    return "\n".join(lines)


def run(args: argparse.Namespace, hw: hardware.Hardware | None) -> int:
    from dsv3_jax.parallel.sharding import make_mesh
    from dsv3_jax.presets import load_config

    hbm = args.hbm_gib * GIB if args.hbm_gib is not None else (hw.hbm_bytes if hw else 80 * GIB)
    emit = functools.partial(print, file=sys.stderr if args.json else sys.stdout, flush=True)
    seq = [[f"data.seq_len={s}"] for s in args.seq_len or []] or [[]]
    configs = [load_config(args.config, [*args.overrides, *s]) for s in seq]
    for c in configs:
        if args.search:
            fit = search(c, args.devices, hbm, hw, args.max_compiles, emit)
            if args.json:
                print(json.dumps({"devices": args.devices, "ranking": fit}))
            else:
                emit(format_ranking(fit) if fit else "no mesh fits")
            if args.require_fit and not fit:
                raise ConfigError(f"does not fit: no mesh of {args.devices} devices fits {_gib(hbm)} GiB")
            continue
        p = plan(c, make_mesh(c.mesh), hbm, hw)
        if args.require_fit and not p["fits"]:
            raise ConfigError(f"does not fit: {_gib(p['bytes_per_device']['total'])} GiB > {_gib(hbm)} GiB per device "
                              f"(mesh {p['mesh']}, seq_len {c.data.seq_len})")
        print(json.dumps(p) if args.json else format_plan(p), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command on the one error path (errors.run_command): bad input is one `error:` line and status 2,
    Ctrl-C (also during compilation) one line and status 130."""
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    from dsv3_jax.tools import plan_decode  # noqa: PLC0415

    if plan_decode.requested(argv):  # --mode decode: the sampling plan, its own flags
        return plan_decode.main(argv)
    args = parse_args(argv)
    from dsv3_jax.presets import load_config  # noqa: PLC0415

    cfg = load_config(args.config, args.overrides)  # input errors before jax starts
    if args.devices <= 0:
        raise ConfigError(f"--devices must be positive, got {args.devices}")
    if not args.search:
        check_mesh(cfg, args.devices, args.seq_len)
    hw = hardware.get(args.hardware) if args.hardware else None
    use_fake_devices(args.devices)
    return run(args, hw)


if __name__ == "__main__":
    sys.exit(main())
