"""This project against transformers on this machine:
`python -m dsv3_jax.tools.bench [--quick] [--json] [--config NAME]`.

One run measures, side by side: (a) the float32 matmul peak (a large jnp.dot), and jnp.dot against torch.mm at two
of the train step's shapes, (b) our train step's tokens/s and MFU on the named config, (c) the identical step (same
weights, batch, AdamW, grad clip) in transformers on PyTorch and the ratio, (d) one MoE layer against a dense SwiGLU
FFN of the same activated FLOPs (forward + backward), (e) decode against transformers' `generate`
(`tools.bench_decode`), (f) the train step's compile time against
depth. Every figure is a median after a warm-up; every ratio is computed from the figures it divides. Both sides
train without MTP (transformers has no MTP training path), so the comparison is one model.

`--suite accelerator --out DIR [--tiny]` runs the accelerator suite instead (`tools.bench_accelerator`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time

from dsv3_jax.config import Config
from dsv3_jax.errors import ArgumentParser, ConfigError, run_command
from dsv3_jax.tools.timing import median_s, paired_medians_s, row

# jax, numpy and the model load inside the functions that use them: `python -m dsv3_jax.tools.bench` imports this
# module before `main` installs the error path, and an import of jax interrupted by Ctrl-C would be a traceback


@dataclasses.dataclass(frozen=True)
class Budget:
    """Repeats and sizes of one run: full (about 10 minutes on 2 CPU cores) or quick."""

    matmul_n: int = 2048
    matmul_repeats: int = 7
    train_steps: int = 7
    moe_repeats: int = 9
    depths: tuple[int, ...] = (2, 4, 8)


FULL = Budget()


QUICK = Budget(matmul_n=1024, matmul_repeats=5, train_steps=3, moe_repeats=5, depths=(2, 4))


def matmul_gflops(n: int, repeats: int) -> float:
    """float32 GFLOP/s of an n x n @ n x n jnp.dot (median)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    return 2 * n**3 / median_s(lambda: f(a, b).block_until_ready(), repeats) / 1e9


def matmul_vs_torch(m: int, k: int, n: int, repeats: int) -> tuple[float, float]:
    """float32 GFLOP/s of (m, k) @ (k, n) products: jnp.dot at HIGHEST (what every linear layer of the step runs)
    and torch.mm (what transformers' step runs), timed alternately. Each timed call makes enough products for
    about 0.2 GFLOP (in one compiled loop for jnp), so dispatch costs drop out at small shapes. The ratio bounds
    what the train step can reach against transformers at equal FLOPs: matmuls are most of both steps."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    inner = max(1, int(2e8 // (2 * m * k * n)))
    hi = jax.lax.Precision.HIGHEST
    # each product reads a + i, so that XLA cannot hoist it out of the loop; torch does the same add
    loop = jax.jit(lambda a, b: jax.lax.fori_loop(0, inner, lambda i, c: c + jnp.dot(a + i, b, precision=hi)[0, 0],
                                                  jnp.float32(0)))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    def torch_loop():
        c = 0.0
        for i in range(inner):
            c += float(torch.mm(ta + i, tb)[0, 0])
        return c

    ours_s, torch_s = paired_medians_s(lambda: loop(ja, jb).block_until_ready(), torch_loop, repeats, warmup=1)
    flops = 2 * m * k * n * inner / 1e9
    return flops / ours_s, flops / torch_s


def matmul_rows(cfg: Config, budget: Budget, torch_missing: str | None = None) -> list[dict]:
    """(a): the peak, and jnp.dot against torch.mm at two of the train step's shapes: the dense FFN's input
    projection (B*T, D) @ (D, F) and one block of the blocked MoE (block, D) @ (D, moe F); only the peak when
    `torch_missing` says why torch cannot run."""
    m = cfg.model
    rows = [row(f"f32 matmul {budget.matmul_n}^3", matmul_gflops(budget.matmul_n, budget.matmul_repeats), None,
                "GFLOP/s")]
    if torch_missing:
        return rows
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    for what, shape in (("dense FFN", (tokens, m.hidden_size, m.intermediate_size)),
                        ("MoE block", (cfg.impl.moe_block_size, m.hidden_size, m.moe_intermediate_size))):
        ours, ref = matmul_vs_torch(*shape, budget.matmul_repeats)
        rows.append(row(f"f32 matmul {'x'.join(map(str, shape))} ({what}) vs torch.mm", ours, ref, "GFLOP/s"))
    return rows


def hf_train(cfg: Config, model):
    """A call of one step of transformers' DeepseekV3ForCausalLM on the same weights and batch: forward, float32
    cross-entropy on the next tokens, backward, global-norm clip, torch AdamW."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    from dsv3_jax.interop import hf
    from dsv3_jax.tools.train_call import synthetic_batch

    with tempfile.TemporaryDirectory() as d:
        hf.save(model, d)
        ref = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    ref.train()
    t = cfg.train
    opt = torch.optim.AdamW(ref.parameters(), lr=t.learning_rate, betas=(t.b1, t.b2), weight_decay=t.weight_decay)
    tokens = torch.from_numpy(synthetic_batch(cfg)["tokens"]).long()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def one():
        opt.zero_grad(set_to_none=True)
        logits = ref(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), t.grad_clip)
        opt.step()

    return one


def moe_vs_dense(cfg: Config, repeats: int) -> tuple[float, float]:
    """(MoE layer seconds, dense FFN seconds), forward + backward on B*T tokens. The dense FFN's hidden width is
    (K + shared) * moe_intermediate_size: the expert FLOPs a token activates (the router's D x E is extra)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv3_jax.kernels.precision import policy
    from dsv3_jax.model.layers import MLP
    from dsv3_jax.model.moe import MoE

    m = cfg.model
    b, t = cfg.train.global_batch_size, cfg.data.seq_len
    x = jax.random.normal(jax.random.key(0), (b, t, m.hidden_size), jnp.float32)
    valid = jnp.ones((b, t), bool)
    moe = MoE(m, cfg.impl, nnx.Rngs(0))
    width = (m.num_experts_per_tok + m.n_shared_experts) * m.moe_intermediate_size
    dense = MLP(m, width, policy(cfg.impl), nnx.Rngs(0))

    def timed(module, call):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        @jax.jit
        def grad(params, x):
            def loss(p, x):
                return call(nnx.merge(graphdef, p, rest), x).sum()

            return jax.grad(loss, argnums=(0, 1))(params, x)

        return lambda: jax.block_until_ready(grad(params, x))

    return paired_medians_s(timed(moe, lambda mod, x: mod(x, valid)[0]), timed(dense, lambda mod, x: mod(x)), repeats)


def _decode_rows(quick: bool, cfg: Config) -> list[dict]:
    """Decode tok/s (batch 1 and 16) against transformers' generate, cache bytes/token, speculative decoding, on the
    model the train section trains."""
    from dsv3_jax.tools import bench_decode

    return bench_decode.run(quick, cfg=cfg.model)


def compile_seconds(cfg: Config, layers: int) -> float:
    """Seconds to lower and compile the train step of `cfg` with `layers` layers (the dense prefix kept)."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.config import apply_overrides
    from dsv3_jax.parallel.sharding import make_mesh, rules_for, use_rules
    from dsv3_jax.train import state as train_state
    from dsv3_jax.train.step import BATCH_KEYS, jit_train_step

    dense = min(cfg.model.first_k_dense_replace, layers - 1)
    cfg = apply_overrides(cfg, [f"model.num_hidden_layers={layers}", f"model.first_k_dense_replace={dense}"])
    with use_rules(rules_for(cfg.mesh)):
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        abstract, graphdef, tx = train_state.abstract_state(cfg, mesh)
        step = jit_train_step(cfg, graphdef, tx, mesh, abstract, donate=False)
        b, t = cfg.train.global_batch_size, cfg.data.seq_len + 1
        batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in BATCH_KEYS}
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            step.lower(abstract, batch).compile()
            return time.perf_counter() - t0


def bench_config(name: str, overrides: list[str] = ()) -> Config:
    """The preset with MTP off (both sides train the same model) and one data-parallel device."""
    from dsv3_jax.presets import load_config

    return load_config(name, ["model.num_nextn_predict_layers=0", "mesh.data=1", *overrides])


SECTIONS = ("matmul", "train", "moe", "decode", "compile")


def run(name: str = "bench", quick: bool = False, overrides: list[str] = (), log=None,
        only: tuple[str, ...] = SECTIONS, torch_missing: str | None = None) -> dict:
    """The sections in `only` (the matmul peak always: MFU needs it); returns {"config", "quick", "machine",
    "sections": {name: [rows]}, "skipped": {what: why}} (rows as `row`). `torch_missing` (why torch or
    transformers cannot run): the torch.mm rows, transformers' step and the decode section are skipped, each with
    one line in `log`, and our step is timed alone."""
    from dsv3_jax.tools.train_call import our_train
    from dsv3_jax.train.metrics import flops_per_token

    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"--only: unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    budget = QUICK if quick else FULL
    cfg = bench_config(name, list(overrides))
    say = log or (lambda s: None)
    out = {"config": name, "quick": quick, "machine": _machine(), "sections": {}, "skipped": {}}
    sec = out["sections"]

    def skip(what: str) -> None:
        out["skipped"][what] = torch_missing
        say(f"skipped {what}: {torch_missing}")

    sec["matmul"] = matmul_rows(cfg, budget, torch_missing)
    gflops = sec["matmul"][0]["ours"]
    if torch_missing:
        skip("(a) jnp.dot against torch.mm")
    versus = ", ".join(f"{r['ratio']:.2f}x" for r in sec["matmul"][1:])
    say(f"(a) matmul {gflops:.1f} GFLOP/s" + (f"; at the step's shapes against torch.mm {versus}" if versus else ""))

    if "train" in only:
        tokens = cfg.train.global_batch_size * cfg.data.seq_len
        ours_step, model = our_train(cfg)
        if torch_missing:
            skip("(c) transformers' train step")
            ours_s, hf_s = median_s(ours_step, budget.train_steps, warmup=2), None
        else:
            ours_s, hf_s = paired_medians_s(ours_step, hf_train(cfg, model), budget.train_steps)
        ours_rate = tokens / ours_s
        mfu = ours_rate * flops_per_token(cfg.model, cfg.data.seq_len) / (gflops * 1e9)
        say(f"(b) ours {ours_rate:,.0f} tok/s, MFU {100 * mfu:.1f}%" +
            (f"; (c) transformers {tokens / hf_s:,.0f} tok/s" if hf_s else ""))
        sec["train"] = [row("train tokens/s vs transformers", ours_rate, hf_s and tokens / hf_s, "tok/s"),
                        row("train step", ours_s * 1e3, hf_s and hf_s * 1e3, "ms", higher_is_better=False),
                        row("MFU vs (a)", 100 * mfu, None, "%")]
    if "moe" in only:
        _moe_section(cfg, budget, sec, say)
    if "decode" in only and torch_missing:
        skip("(e) decode against transformers' generate")
    elif "decode" in only:
        sec["decode"] = _decode_rows(quick, cfg)
        say("(e) decode done")
    if "compile" in only:
        sec["compile"] = [row(f"train step compile, {n} layers", compile_seconds(cfg, n), None, "s")
                          for n in budget.depths]
        say("(f) compile done")
    return out


def _moe_section(cfg: Config, budget: Budget, sec: dict, say) -> None:
    moe_s, dense_s = moe_vs_dense(cfg, budget.moe_repeats)
    # the target is MoE <= 1.5x dense: the ratio here is MoE time over dense time (lower is better)
    sec["moe"] = [{"name": "MoE layer vs dense FFN of equal activated FLOPs (fwd+bwd)", "ours": moe_s * 1e3,
                   "reference": dense_s * 1e3, "ratio": moe_s / dense_s, "unit": "ms (ratio = MoE / dense)"}]
    say(f"(d) MoE {moe_s * 1e3:.1f} ms, dense {dense_s * 1e3:.1f} ms")


def _machine() -> dict:
    import os
    import platform

    import jax

    return {"backend": jax.default_backend(), "devices": len(jax.devices()), "cpu_cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1min": os.getloadavg()[0]}  # other jobs on the cores skew every figure


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"


def table(result: dict) -> str:
    """The result as a Markdown table."""
    lines = ["| section | measurement | ours | reference | ratio | unit |", "| --- | --- | --- | --- | --- | --- |"]
    for section, rows in result["sections"].items():
        for r in rows:
            ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
            lines.append(f"| {section} | {r['name']} | {_fmt(r['ours'])} | {_fmt(r.get('reference'))} | {ratio} | "
                         f"{r.get('unit', '')} |")
    lines += [f"\nskipped {what}: {why}" for what, why in result.get("skipped", {}).items()]
    return "\n".join(lines)


EPILOG = """torch and transformers (the [bench] extra) run the reference columns: (a)'s torch.mm rows, (c)
transformers' train step and (e) decode against `generate`; without them each of those skips with one line and
the rest runs. The accelerator suite (--suite accelerator) needs them only for its decode section."""


def main(argv: list[str] | None = None) -> int:
    """The command on the one error path (errors.run_command): bad input is one `error:` line and status 2,
    Ctrl-C (also during a compile or a timed loop) one line and status 130."""
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m dsv3_jax.tools.bench", description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument("--suite", choices=("cpu", "accelerator"), default="cpu",
                   help="cpu: this project against transformers (default); accelerator: the GPU/TPU suite "
                        "(tools.bench_accelerator), written to --out as JSON and Markdown")
    p.add_argument("--out", default=None, help="accelerator suite: directory for accelerator.json and .md")
    p.add_argument("--tiny", action="store_true", help="accelerator suite: test-sized shapes (runs on a CPU)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and depths (about 2 minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--config", default="bench", help="preset name or YAML file (default: bench)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SECTIONS)} (accelerator "
                                                "suite: of its sections)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    if args.suite == "accelerator":
        from dsv3_jax.tools import bench_accelerator

        return bench_accelerator.main(args)
    from dsv3_jax.hostmem import reuse_freed_memory
    from dsv3_jax.tools.train_call import missing_reference

    reuse_freed_memory()  # both sides run in this process and see the same allocator
    only = SECTIONS if args.only is None else tuple(x for x in args.only.split(",") if x)
    result = run(args.config, args.quick, args.overrides, log=lambda s: print(s, file=sys.stderr, flush=True),
                 only=only, torch_missing=missing_reference())
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
