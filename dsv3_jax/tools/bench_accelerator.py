"""The accelerator suite: `python -m dsv3_jax.tools.bench --suite accelerator --out DIR [--tiny] [--only ...]`.

Each figure is measured against a reference in the same run, on the first device:
  peak       bf16 matmul n x n x n (float32 accumulation): the peak that MFU is taken against;
  train      the train step of a one-GPU MoE config (dsv3-16b cut to 4 layers, 8 x 4,096 tokens), tokens/s and MFU
             against `peak`, in bf16 and in fp8 (fp8's reference: the bf16 step); MoE and attention backends `auto`;
  moe        one routed-expert FFN forward + backward at DeepSeek-V3's shapes (hidden 7168, expert width 2048, top-8
             of 256 experts): `ragged_dot` and the blocked grouped matmul, in TFLOP/s of the routed rows' FLOPs,
             against three plain matmuls over the same rows (the same useful FLOPs, no grouping: the dense floor);
  attention  causal attention forward + backward at 4K / 16K / 32K (B=1, 16 heads, q/k 128 + 64, v 128): cuDNN and
             the blocked backend against dense (time), with each program's peak memory (XLA's memory analysis of
             the compiled program: arguments + outputs + temporaries); dense is skipped where its (H, T, T) float32
             scores alone would not fit the device;
  fp8        FP8 GEMM (1x128 activation tiles, 128x128 weight blocks, `kernels.fp8`) against a bf16 GEMM at three of
             the model's shapes, forward, TFLOP/s;
  decode     greedy decode tokens/s at batch 1, 16 and 64 on the `bench` config against transformers' `generate` on
             the same device (`tools.bench_decode`; needs torch and transformers, else skipped with one line).
Medians after a warm-up; failures (out of memory, a kernel missing on this platform) are rows with the reason, so one
failure does not lose the rest. DIR/accelerator.json and DIR/accelerator.md are rewritten after every section.
`--tiny` runs every section at test sizes on any machine (tests/test_bench.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from dsv3_jax.errors import ConfigError, print_error
from dsv3_jax.presets import load_config
from dsv3_jax.tools.timing import median_s, row

SECTIONS = ("peak", "train", "moe", "attention", "fp8", "decode")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes and repeats of one run: FULL (one H200, under 8 minutes) or TINY (a CPU, tests)."""

    matmul_n: int
    repeats: int
    train_config: str
    train_overrides: tuple[str, ...]
    moe: dict  # tokens, dim, ffn, experts, k
    attention_lengths: tuple[int, ...]
    attention: dict  # heads, nope, rope, v, block
    fp8_shapes: tuple[tuple[int, int, int], ...]  # (M, K, N)
    decode_config: str
    decode_batches: tuple[int, ...]
    decode_tokens: int


FULL = Sizes(
    matmul_n=8192, repeats=5, train_config="dsv3-16b",
    train_overrides=("model.num_hidden_layers=4", "train.global_batch_size=8", "train.micro_batches=1",
                     "data.seq_len=4096", "mesh.expert=1", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"),
    moe=dict(tokens=4096, dim=7168, ffn=2048, experts=256, k=8),
    attention_lengths=(4096, 16384, 32768), attention=dict(heads=16, nope=128, rope=64, v=128, block=512),
    fp8_shapes=((8192, 7168, 2048), (8192, 2048, 7168), (8192, 7168, 1536)),
    decode_config="bench", decode_batches=(1, 16, 64), decode_tokens=128)

# tiny's shapes with every linear contraction >= 32 (FP8) and a q/k head dim that is a multiple of 8
TINY_MODEL = ("model.hidden_size=64", "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=32",
              "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.num_attention_heads=2",
              "model.intermediate_size=64", "model.moe_intermediate_size=32")

TINY = Sizes(
    matmul_n=128, repeats=2, train_config="tiny",
    train_overrides=(*TINY_MODEL, "data.seq_len=64", "train.global_batch_size=2", "mesh.data=1"),
    moe=dict(tokens=64, dim=32, ffn=16, experts=8, k=2),
    attention_lengths=(64, 128, 256), attention=dict(heads=2, nope=16, rope=8, v=16, block=64),
    fp8_shapes=((64, 128, 32), (64, 32, 128)),
    decode_config="tiny", decode_batches=(1, 2), decode_tokens=4)

TARGETS = {  # issue 23's targets, checked on the rows they name
    "train bf16": ("MFU >= 40% of the measured bf16 matmul", lambda r: r["mfu_pct"] >= 40),
    "train fp8": ("fp8 step >= 1.3x the bf16 step", lambda r: r["ratio"] >= 1.3),
    "attention cudnn 16384": ("cuDNN >= 2x blocked at 16K", lambda r: r["ratio"] >= 2),
    "decode 1": (">= 10x transformers' generate at batch 1", lambda r: r["ratio"] >= 10),
}


def _compiled(fn, *args):
    """(compiled program, peak bytes: arguments + outputs + temporaries from XLA's memory analysis, or None)."""
    exe = jax.jit(fn).lower(*args).compile()
    ma = exe.memory_analysis()
    parts = [getattr(ma, f"{k}_size_in_bytes", None) for k in ("argument", "output", "temp")] if ma else [None]
    return exe, (sum(parts) if None not in parts else None)


def _random(key: int, shape, dtype=jnp.bfloat16) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def peak_rows(s: Sizes) -> list[dict]:
    n = s.matmul_n
    a, b = _random(0, (n, n)), _random(1, (n, n))
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    sec = median_s(lambda: dot(a, b).block_until_ready(), max(s.repeats, 5))
    return [row(f"bf16 matmul {n}^3 (the MFU peak)", 2 * n**3 / sec / 1e12, None, "TFLOP/s")]


def train_rows(s: Sizes, peak_tflops: float, log) -> list[dict]:
    """bf16 and fp8 train steps of the one-GPU config: tokens/s, MFU against the measured peak; fp8 against bf16."""
    from dsv3_jax.kernels import attention as ops
    from dsv3_jax.kernels.platform import platform
    from dsv3_jax.model.moe import local_impl
    from dsv3_jax.tools.train_call import our_train
    from dsv3_jax.train.metrics import flops_per_token

    rows, rates = [], {}
    for prec in ("bf16", "fp8"):
        cfg = load_config(s.train_config, [*s.train_overrides, f"impl.precision={prec}"])
        tokens = cfg.train.global_batch_size * cfg.data.seq_len
        t0 = time.perf_counter()
        one, _ = our_train(cfg)
        one()
        first_s = time.perf_counter() - t0
        step_s = median_s(one, s.repeats)
        del one
        gc.collect()
        rate = tokens / step_s
        tflops = rate * flops_per_token(cfg.model, cfg.data.seq_len) / 1e12
        rates[prec] = rate
        ref = rates["bf16"] if prec == "fp8" else None
        r = row(f"train {prec}", rate, ref, "tokens/s", mfu_pct=100 * tflops / peak_tflops, model_tflops=tflops,
                step_s=step_s, first_call_s=first_s, tokens_per_step=tokens, precision=prec,
                moe_backend=local_impl(platform()) if cfg.impl.moe_impl == "auto" else cfg.impl.moe_impl,
                attention_backend=ops.resolve(cfg.impl.attention, cfg.data.seq_len, True, prec == "fp32"))
        rows.append(r)
        log(f"train {prec}: {rate:,.0f} tokens/s, MFU {r['mfu_pct']:.1f}% (first call {first_s:.0f} s)")
    return rows


def moe_rows(s: Sizes, log) -> list[dict]:
    """Routed-expert FFN forward + backward: ragged_dot and blocked against plain matmuls over the same rows."""
    from dsv3_jax.config import ImplConfig
    from dsv3_jax.kernels.precision import policy
    from dsv3_jax.model.moe_backends import BACKENDS, ExpertWeights, MoeContext
    from dsv3_jax.model.routing import Routing

    m = s.moe
    n, d, f, e, k = m["tokens"], m["dim"], m["ffn"], m["experts"], m["k"]
    impl = ImplConfig(precision="bf16")
    pol = policy(impl)
    x = _random(0, (n, d))
    w = ExpertWeights(_random(1, (e, d, f)) * 0.02, _random(2, (e, d, f)) * 0.02, _random(3, (e, f, d)) * 0.02)
    # balanced random routing: each token's k distinct experts
    idx = jnp.argsort(jax.random.uniform(jax.random.key(4), (n, e)), axis=1)[:, :k].astype(jnp.int32)
    gates = jnp.full((n, k), 1.0 / k, jnp.float32)
    useful = 18 * n * k * d * f  # 3 matmuls x (forward + 2 backward) x 2 FLOPs per multiply-add, per routed row

    def grad_of(loss):  # routing passed in, as in the model (never a constant XLA could fold)
        g = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return lambda: jax.block_until_ready(g(x, w, idx, gates))

    def dense(x, w, idx, gates):  # the routed rows (each token k times) through expert 0: same FLOPs, no grouping
        xr = jnp.repeat(x, k, axis=0)
        h = jax.nn.silu(jnp.dot(xr, w.w_gate[0], preferred_element_type=jnp.float32)) * jnp.dot(
            xr, w.w_up[0], preferred_element_type=jnp.float32)
        return jnp.dot(h.astype(x.dtype), w.w_down[0], preferred_element_type=jnp.float32).sum()

    ref_s = median_s(grad_of(dense), s.repeats)
    rows = [row("MoE dense reference (plain matmuls over the routed rows)", useful / ref_s / 1e12, None, "TFLOP/s",
                ms=ref_s * 1e3)]
    for name in ("ragged_dot", "blocked"):
        ctx = MoeContext(pol, impl.moe_block_size, blocks_per_step=0)

        def loss(x, w, idx, gates, name=name, ctx=ctx):
            return BACKENDS[name].fn(x, Routing(idx, gates), w, ctx).astype(jnp.float32).sum()

        try:
            sec = median_s(grad_of(loss), s.repeats)
            rows.append(row(f"MoE {name}", useful / sec / 1e12, useful / ref_s / 1e12, "TFLOP/s", ms=sec * 1e3))
        except Exception as err:  # noqa: BLE001  (out of memory: a row with the reason)
            rows.append(_failed(f"MoE {name}", err))
        log(f"moe {name}: {rows[-1].get('ours') or rows[-1].get('error')} TFLOP/s")
    return rows


def _failed(name: str, err: Exception) -> dict:
    return {"name": name, "ours": None, "reference": None, "ratio": None, "unit": "",
            "error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"}


def _skipped(name: str, why: str) -> dict:
    return {"name": name, "ours": None, "reference": None, "ratio": None, "unit": "", "skipped": why}


def _device_bytes() -> int | None:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return (stats or {}).get("bytes_limit")


def attention_rows(s: Sizes, log) -> list[dict]:
    """Causal attention forward + backward per length: cuDNN and blocked against dense (ms, peak memory)."""
    rows = []
    for t in s.attention_lengths:
        rows += _attention_at(s, t, log)
    return rows


def _attention_at(s: Sizes, t: int, log) -> list[dict]:
    from dsv3_jax.config import ImplConfig
    from dsv3_jax.kernels import attention as ops
    from dsv3_jax.kernels.platform import platform
    from dsv3_jax.kernels.precision import policy

    a = s.attention
    h, dn, dr, dv = a["heads"], a["nope"], a["rope"], a["v"]
    pol = policy(ImplConfig(precision="bf16"))
    limit = _device_bytes()
    args = (_random(0, (1, t, h, dn)), _random(1, (1, t, h, dr)), _random(2, (1, t, h, dn)), _random(3, (1, t, dr)),
            _random(4, (1, t, h, dv)))  # q_nope, q_rope, k_nope, k_rope (shared by the heads), v
    seg = jnp.ones((1, t), jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    scale = (dn + dr) ** -0.5
    rows, times = [], {}
    for name in ("dense", "blocked", "cudnn"):
        label = f"attention {name} {t}"
        platforms = ops.BACKENDS[name].platforms
        if platforms is not None and platform() not in platforms:
            rows.append(_skipped(label, f"{name} runs on {'/'.join(platforms)} only"))
            continue
        if name == "dense" and limit is not None and 2 * 4 * h * t * t > limit / 2:
            rows.append(_skipped(label, f"its float32 scores and probabilities alone need "
                                        f"{2 * 4 * h * t * t / 2**30:.0f} GiB"))
            continue

        def loss(q_nope, q_rope, k_nope, k_rope, v, name=name):
            out = ops.BACKENDS[name].fn(q_nope, q_rope, k_nope, k_rope, v, seg, seg, pos, pos, scale, pol, a["block"])
            return out.astype(jnp.float32).sum()

        try:
            exe, peak = _compiled(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), *args)
            sec = median_s(lambda exe=exe: jax.block_until_ready(exe(*args)), s.repeats)
        except Exception as err:  # noqa: BLE001
            rows.append(_failed(label, err))
            continue
        times[name] = sec
        ref = None if name == "dense" else times.get("blocked" if name == "cudnn" else "dense")
        rows.append(row(label, sec * 1e3, ref and ref * 1e3, "ms (fwd+bwd)", higher_is_better=False,
                        peak_gib=None if peak is None else peak / 2**30, length=t,
                        reference_backend={"blocked": "dense", "cudnn": "blocked"}.get(name)))
        log(f"attention {name} T={t}: {sec * 1e3:.1f} ms, peak {rows[-1]['peak_gib']} GiB")
    return rows


def fp8_rows(s: Sizes, log) -> list[dict]:
    """FP8 GEMM (1x128 / 128x128 scaling, `kernels.fp8.fp8_matmul`) against bf16 at the model's shapes, forward."""
    from dsv3_jax.kernels.fp8 import fp8_matmul

    bf16 = jax.jit(lambda x, w: jnp.einsum("gmk,gkn->gmn", x, w, preferred_element_type=jnp.float32))
    fp8 = jax.jit(fp8_matmul)
    rows = []
    for mm, kk, nn in s.fp8_shapes:
        args = (_random(0, (1, mm, kk)), _random(1, (1, kk, nn)) * 0.02)
        flops = 2 * mm * kk * nn
        ref_s = median_s(lambda args=args: bf16(*args).block_until_ready(), s.repeats)
        sec = median_s(lambda args=args: fp8(*args).block_until_ready(), s.repeats)
        rows.append(row(f"fp8 GEMM {mm}x{kk}x{nn}", flops / sec / 1e12, flops / ref_s / 1e12, "TFLOP/s"))
        log(f"fp8 {mm}x{kk}x{nn}: {rows[-1]['ours']:.2f} vs bf16 {rows[-1]['reference']:.2f} TFLOP/s")
    return rows


def decode_rows(s: Sizes, log) -> list[dict]:
    """Greedy decode against transformers' generate, both on this device (torch's GPU when JAX runs on one)."""
    import torch

    from dsv3_jax.tools import bench_decode

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    cfg = load_config(s.decode_config).model
    rows = bench_decode.run(True, cfg=cfg, checkpoint=None, new_tokens=s.decode_tokens, batches=s.decode_batches,
                            hf_device=device)
    for r in rows:
        r["transformers_device"] = device
    log(f"decode: {[(r['name'], round(r['ratio'] or 0, 2)) for r in rows]}")
    return rows


def _check_targets(result: dict) -> None:
    """Each target row gets target (the text) and met (True / False)."""
    for sec in result["sections"].values():
        for r in sec:
            key = r["name"]
            if key.startswith("attention cudnn"):
                key = f"attention cudnn {r.get('length')}"
            elif key.startswith("greedy decode, batch "):
                key = "decode " + key.split("batch ")[1].split(",")[0]
            measured = r.get("mfu_pct") if key == "train bf16" else r.get("ratio")
            if key in TARGETS and measured is not None:
                text, test = TARGETS[key]
                r["target"], r["met"] = text, bool(test(r))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Accelerator suite, {result['date']}: {m['device_kind']} ({m['backend']}), jax {m['jax']}"
             f"{' (--tiny)' if result['tiny'] else ''}", "",
             "| section | measurement | ours | reference | ratio | unit | notes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for section, rows in result["sections"].items():
        for r in rows:
            notes = []
            if r.get("mfu_pct") is not None:
                notes.append(f"MFU {_fmt(r['mfu_pct'])}%")
            if r.get("peak_gib") is not None:
                notes.append(f"peak {r['peak_gib']:.3g} GiB")
            if r.get("reference_backend"):
                notes.append(f"vs {r['reference_backend']}")
            if "target" in r:
                notes.append(f"target {r['target']}: {'met' if r['met'] else 'not met'}")
            for k in ("skipped", "error", "rows_identical"):
                if r.get(k):
                    notes.append(f"{k.replace('_', ' ')}: {r[k]}")
            ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
            lines.append(f"| {section} | {r['name']} | {_fmt(r.get('ours'))} | {_fmt(r.get('reference'))} | {ratio} | "
                         f"{r.get('unit', '')} | {'; '.join(notes)} |")
    for what, why in result["skipped"].items():
        lines.append(f"\nskipped {what}: {why}")
    return "\n".join(lines) + "\n"


def _machine() -> dict:
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind, "devices": jax.device_count(),
            "jax": jax.__version__, "device_bytes": _device_bytes()}


def run(out_dir: str | pathlib.Path, tiny: bool = False, only: tuple[str, ...] = SECTIONS, log=None) -> dict:
    """The sections in `only` (peak always: MFU needs it); writes DIR/accelerator.json and .md after each section and
    returns the result {"date", "tiny", "machine", "sections": {name: rows}, "skipped": {section: why}}."""
    from dsv3_jax.tools.train_call import missing_reference

    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    s = TINY if tiny else FULL
    say = log or (lambda line: None)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "tiny": tiny,
              "machine": _machine(), "sections": {}, "skipped": {}}

    def save() -> None:
        _check_targets(result)
        (out / "accelerator.json").write_text(json.dumps(result, indent=1))
        (out / "accelerator.md").write_text(table(result))

    sec = result["sections"]
    sec["peak"] = peak_rows(s)
    peak = sec["peak"][0]["ours"]
    say(f"peak: bf16 matmul {peak:.1f} TFLOP/s")
    save()
    steps = {"train": lambda: train_rows(s, peak, say), "moe": lambda: moe_rows(s, say),
             "attention": lambda: attention_rows(s, say), "fp8": lambda: fp8_rows(s, say),
             "decode": lambda: decode_rows(s, say)}
    for name in SECTIONS[1:]:
        if name not in only:
            continue
        why = missing_reference() if name == "decode" else None
        if why:
            result["skipped"][name] = why
            say(f"skipped {name}: {why}")
            continue
        try:
            sec[name] = steps[name]()
        except Exception as err:  # noqa: BLE001  (a section that fails is one row; the others still run)
            sec[name] = [_failed(name, err)]
            say(f"{name} failed: {sec[name][0]['error']}")
        gc.collect()
        save()
    save()
    return result


def main(args) -> int:
    """`bench --suite accelerator` (args from tools.bench's parser)."""
    if not args.out:
        return print_error(ConfigError("--suite accelerator needs --out DIR"))
    only = SECTIONS if args.only is None else tuple(x for x in args.only.split(",") if x)
    try:
        result = run(args.out, args.tiny, only, log=lambda line: print(line, file=sys.stderr, flush=True))
    except ConfigError as e:
        return print_error(e)
    print(table(result))
    return 0
