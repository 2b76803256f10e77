"""Decode plan: compile the sampling decode loop for N devices on N fake CPU devices, with the released checkpoint's
FP8 weights as abstract E4M3 parameters (no weights read), and read per-device bytes off the shardings and XLA.

    python -m dsv3_jax.tools.plan --mode decode --config deepseek-v3-671b --devices 8 --hardware H200 \\
        --batch 64 --context 8192

The program is `infer.sampling`'s decode loop exactly as `generate(mesh=)` compiles it (DECODE_RULES, rows and
caches over the batch axes, experts over `expert`), for --batch rows at a --context-slot cache. Per device it prints
the weights (E4M3 values, their block scales, the bf16 rest; the MTP module's share, resident but not read by plain
decoding), the latent cache, XLA's temporaries, and whether the sum fits the device. The tokens/s estimate is
bytes-bound: one step reads every non-expert weight but the embedding table (a row gather), the routed experts
that some row of the batch picks (expected fraction 1 - (1 - K/E)^B under uniform routing) and the rows' caches
at the full context, at the device's HBM bandwidth; communication and compute are not counted, so it is an upper
bound. Bad input prints `error: <reason>` on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

from dsv3_jax.errors import ArgumentParser, ConfigError
from dsv3_jax.tools import hardware

GB = 1e9
ESTIMATE_BATCHES = (1, 16, 64, 256)


def requested(argv: list[str]) -> bool:
    """Whether `argv` asks the planner for the decode plan (`--mode decode`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--mode", default="train")
    return p.parse_known_args(argv)[0].mode == "decode"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m dsv3_jax.tools.plan --mode decode", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--mode", choices=["decode"], required=True)
    p.add_argument("--config", default="small", help="preset name or YAML file (its model section)")
    p.add_argument("--devices", type=int, required=True, help="number of devices to plan for (faked on CPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.hidden_size=256")
    p.add_argument("--mesh", default=None, help="decode mesh as axis=size pairs (default expert=--devices)")
    p.add_argument("--hardware", default="H200", help=f"one of: {', '.join(hardware.TABLE)}")
    p.add_argument("--hbm-gb", type=float, help="device memory in GB (default: the --hardware's HBM)")
    p.add_argument("--batch", type=int, default=64, help="rows of the compiled decode step")
    p.add_argument("--context", type=int, default=8192, help="cache slots per row")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_intermixed_args(argv)


def parse_mesh(text: str | None, devices: int):
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.parallel.sharding import MESH_AXES

    if text is None:
        return MeshConfig(data=1, expert=devices)
    sizes = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.lstrip("-").isdigit():
            raise ConfigError(f"--mesh takes axis=size pairs over {', '.join(MESH_AXES)}, got {part!r}")
        sizes[name] = int(value)
    return MeshConfig(**{"data": -1, **sizes})


def abstract_decode_state(cfg, impl, mesh, rules):
    """(graphdef, state) of the model `generate` compiles (`Programs.decode_state`), as ShapeDtypeStructs
    with their shardings: every tensor the released checkpoint quantises an `Fp8Weight` of E4M3 values and
    float32 block scales (interop/fp8_layout.py), the rest in the impl's parameter dtype."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from dsv3_jax.interop.fp8_layout import block_suffix, blockings, scale_spec
    from dsv3_jax.kernels.fp8_weights import Fp8Weight, scale_shape
    from dsv3_jax.model.routing import RouterBias
    from dsv3_jax.model.transformer import Transformer
    from dsv3_jax.parallel.sharding import fit_spec, logical_spec, param_axes

    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), impl))  # stacked: FP8 decodes on the stack
    fp8 = blockings(cfg)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        a = var.get_value()
        spec = fit_spec(logical_spec(param_axes(var), rules), a.shape, mesh)
        sharding = NamedSharding(mesh, spec)
        blocked = fp8.get(block_suffix(path)) if isinstance(var, nnx.Param) else None
        if blocked is None:
            var.set_value(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding))
            continue
        q = jax.ShapeDtypeStruct(a.shape, jnp.float8_e4m3fn, sharding=sharding)
        s = jax.ShapeDtypeStruct(scale_shape(a.shape, blocked), jnp.float32,
                                 sharding=NamedSharding(mesh, scale_spec(spec, a.shape, blocked, mesh)))
        var.set_value(Fp8Weight(q, s, blocked, a.dtype))
    graphdef, *state = nnx.split(model, nnx.Param, RouterBias, ...)
    return graphdef, tuple(state)


def shard_bytes(tree) -> int:
    """One device's bytes of every ShapeDtypeStruct in `tree` (its largest shard)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def weight_bytes(state) -> dict:
    """Per-device weight bytes by kind: routed experts of the main layers, the MTP module, the embedding table and
    the rest; E4M3 values and scales apart."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    out = {"fp8_values": 0, "fp8_scales": 0, "other": 0, "routed_experts": 0, "mtp": 0, "embed": 0, "rest": 0}
    for part in state:
        for path, var in nnx.to_flat_state(part):
            leaves = jax.tree.leaves(var.get_value())
            n = shard_bytes(leaves)
            for x in leaves:
                kind = "fp8_values" if x.dtype == jnp.float8_e4m3fn else "fp8_scales" if len(leaves) > 1 else "other"
                out[kind] += shard_bytes(x)
            if path[0] == "mtp":
                out["mtp"] += n
            elif path[0] == "embed":
                out["embed"] += n
            elif path[0] == "moe_layers" and path[-1] in ("w_gate", "w_up", "w_down"):
                out["routed_experts"] += n
            else:
                out["rest"] += n
    out["total"] = out["fp8_values"] + out["fp8_scales"] + out["other"]
    return out


def compile_decode(cfg, impl, mesh, rules, batch: int, context: int):
    """The decode loop compiled for `batch` rows and `context` cache slots: (weights, cache bytes, XLA memory
    analysis, compile seconds), all per device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from dsv3_jax.infer import sampling
    from dsv3_jax.parallel.sharding import fit_spec, logical_spec, use_rules

    graphdef, state = abstract_decode_state(cfg, impl, mesh, rules)
    prompt = 16
    budget = context - prompt - 1
    slots = sampling.round_up(prompt + budget + 1, 64)
    i32 = jnp.int32
    args = (state, jax.ShapeDtypeStruct((batch, prompt), i32), jax.ShapeDtypeStruct((batch,), i32),
            jax.ShapeDtypeStruct((8,), i32), jax.eval_shape(lambda: jax.random.key(0)),
            jax.ShapeDtypeStruct((batch,), jnp.bool_))
    rule = sampling.SamplingRule()

    def rows(x):  # a cache array ([L,] B, S, .): its rows split as `sampling.split_rows` places them
        spec = fit_spec(logical_spec((None,) * (x.ndim - 3) + ("batch", None, None), rules), x.shape, mesh)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh), use_rules(rules):
        carry = jax.eval_shape(functools.partial(sampling._prefill_fn, graphdef, rule, False, slots, budget), *args)
        caches = (carry.cache, carry.mtp_cache)
        carry = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), carry)
        carry = carry._replace(cache=jax.tree.map(rows, caches[0]), mtp_cache=caches[1])
        t0 = time.perf_counter()
        chunk = jax.jit(functools.partial(sampling._chunk_fn, graphdef, rule, False), donate_argnums=(1,))
        compiled = chunk.lower(state, carry, args[3], np.int32(1)).compile(sampling.FP8_COMPILER_OPTIONS)
    return weight_bytes(state), shard_bytes(carry.cache), compiled.memory_analysis(), time.perf_counter() - t0


def estimate(cfg, weights: dict, rows_per_step: int, batch: int, context: int, hbm_bw: float) -> dict:
    """Bytes-bound decode speed at `batch` rows: bytes one device reads per step / HBM bandwidth."""
    from dsv3_jax.infer.sampling import cache_bytes_per_token

    touched = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch
    rows_dev = math.ceil(batch / rows_per_step)
    cache = rows_dev * context * cache_bytes_per_token(cfg, "bfloat16")
    step = weights["rest"] + touched * weights["routed_experts"] + cache
    step_s = step / hbm_bw
    return {"batch": batch, "rows_per_device": rows_dev, "experts_read": touched, "cache_read_bytes": cache,
            "step_bytes": step, "step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s,
            "tokens_per_s_per_row": 1 / step_s}


def plan(args) -> dict:
    import jax.numpy as jnp  # noqa: F401  (jax starts here, on the fake devices)

    from dsv3_jax.config import ImplConfig
    from dsv3_jax.infer.sampling import DECODE_RULES, cache_bytes_per_token
    from dsv3_jax.parallel.sharding import logical_size, make_mesh
    from dsv3_jax.presets import check_impl, load_config

    cfg = load_config(args.config, args.overrides).model
    impl = check_impl(ImplConfig(dtype="bfloat16", param_dtype="bfloat16", precision="bf16").validate())
    hw = hardware.get(args.hardware)
    hbm = args.hbm_gb * GB if args.hbm_gb is not None else hw.hbm_bytes
    mesh = make_mesh(parse_mesh(args.mesh, args.devices))
    if cfg.n_routed_experts % mesh.shape["expert"]:
        raise ConfigError(f"model.n_routed_experts ({cfg.n_routed_experts}) is not divisible by mesh expert "
                          f"({mesh.shape['expert']})")
    dp = logical_size(mesh, "batch", DECODE_RULES)
    batch = -(-args.batch // dp) * dp
    weights, cache, mem, compile_s = compile_decode(cfg, impl, mesh, DECODE_RULES, batch, args.context)
    total = weights["total"] + cache + mem.temp_size_in_bytes
    return {"config": args.config, "devices": args.devices, "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "hardware": hw.name, "hbm_bytes": hbm, "batch": batch, "context": args.context,
            "cache_bytes_per_token": cache_bytes_per_token(cfg, "bfloat16"),
            "bytes_per_device": {"weights": weights, "cache": cache, "temporaries": mem.temp_size_in_bytes,
                                 "xla_arguments": mem.argument_size_in_bytes, "total": total},
            "fits": total <= hbm, "compile_s": compile_s,
            "estimate": [estimate(cfg, weights, dp, b, args.context, hw.hbm_bw) for b in ESTIMATE_BATCHES]}


def _gb(b: float) -> str:
    return f"{b / GB:,.2f}"


def format_plan(p: dict) -> str:
    b, w = p["bytes_per_device"], p["bytes_per_device"]["weights"]
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [f"decode plan: {p['config']} on {p['devices']} x {p['hardware']} (mesh {mesh}), batch {p['batch']}, "
             f"context {p['context']} (cache {p['cache_bytes_per_token']:,} bytes/token, bf16)",
             "per device                          GB",
             f"  weights                    {_gb(w['total']):>10}   E4M3 {_gb(w['fp8_values'])} + scales "
             f"{_gb(w['fp8_scales'])} + bf16 {_gb(w['other'])}",
             f"    routed experts           {_gb(w['routed_experts']):>10}",
             f"    non-expert (read/step)   {_gb(w['rest']):>10}",
             f"    embedding (row gather)   {_gb(w['embed']):>10}",
             f"    MTP module (not read)    {_gb(w['mtp']):>10}",
             f"  latent cache               {_gb(b['cache']):>10}",
             f"  XLA temporaries            {_gb(b['temporaries']):>10}",
             f"  total                      {_gb(b['total']):>10}   of {_gb(p['hbm_bytes'])}: "
             f"{'fits' if p['fits'] else 'DOES NOT FIT'} (XLA's argument bytes {_gb(b['xla_arguments'])}; "
             f"compiled in {p['compile_s']:.0f} s)",
             "bytes-bound estimate (one step reads the non-expert weights, the experts some row picks, the rows' "
             "caches at full context)",
             "  batch  rows/dev  experts read  step GB  step ms   tokens/s  tokens/s/row"]
    for e in p["estimate"]:
        lines.append(f"  {e['batch']:>5}  {e['rows_per_device']:>8}  {100 * e['experts_read']:>11.1f}%  "
                     f"{e['step_bytes'] / 1e9:>7.2f}  {e['step_ms']:>7.2f}  {e['tokens_per_s']:>9,.0f}  "
                     f"{e['tokens_per_s_per_row']:>12,.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """The decode plan (called by tools/plan.py for `--mode decode`, on its error path)."""
    from dsv3_jax.presets import load_config
    from dsv3_jax.tools.fake_devices import use_fake_devices

    args = parse_args(argv)
    load_config(args.config, args.overrides)  # input errors before jax starts
    if args.devices <= 0 or args.batch <= 0 or args.context <= 16:
        raise ConfigError(f"--devices and --batch must be positive and --context > 16, got {args.devices}, "
                          f"{args.batch}, {args.context}")
    hardware.get(args.hardware)
    parse_mesh(args.mesh, args.devices)
    use_fake_devices(args.devices)
    p = plan(args)
    print(json.dumps(p) if args.json else format_plan(p), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
