"""Context extension at small scale, as one command: `small` trained at 256 tokens, extended to 2,048 with YaRN, and
the held-out loss by in-document position before and after (docs/context_extension.md).

    python benchmarks/context_extension.py --out docs/context_extension --runs runs/context_extension

The extension is DeepSeek-V3's (4K -> 32K -> 128K, YaRN factor 40) scaled down: factor 8 = 2048 / 256, beta_fast 32,
beta_slow 1, mscale 0.1 ln(8) + 1 on the softmax scale (its square multiplies 1/sqrt(d)), extension trained at the
short stage's final learning rate (the report extends at its final 7.3e-6). Stages:

1. `short`: the small preset at data.seq_len 256 with model.max_position_embeddings 256 and plain rotary.
2. `short` evaluated at 2,048 (eval.with_model_fields: same weights): without YaRN (positions past 256 were never
   trained) and with YaRN but no training.
3. `yarn`: a new run from `short` (train.init_from: params and router bias as saved, fresh optimizer), YaRN on,
   data.seq_len 2048; and, with --control, `plain`: the same extension training without YaRN.
4. Every condition evaluated on the same held-out rows of 2,048 (eval.evaluate_positions).

Writes OUT/table.md (eval.bucket_table), OUT/buckets.png (plot.plot_position_buckets) and OUT/results.json (the
fine buckets and each stage's wall seconds). A stage whose run dir already finished is resumed at its end (nothing
retrained); `--replot` redraws the table and the plot from OUT/results.json alone.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

SHORT, LONG = 256, 2048
YARN = (f"model.rope_scaling={{factor: {LONG / SHORT}, original_max_position_embeddings: {SHORT}, beta_fast: 32, "
        "beta_slow: 1, mscale: 1.0, mscale_all_dim: 1.0}")
TABLE_EDGES = (0, 256, 1024, 2048)
PLOT_EDGES = (0, 64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 1792, 2048)
QUIET = ["train.eval_every=0", "train.sample_tokens=0", "train.tensorboard=false", "train.progress=false",
         "train.keep_checkpoints=1", "train.log_every=25"]


def merge(fine: list[dict], edges: tuple[int, ...]) -> list[dict]:
    """Buckets with the coarser `edges` (each a union of fine buckets), losses weighted by token counts."""
    out = []
    for lo, hi in zip(edges, edges[1:]):
        part = [b for b in fine if lo <= b["lo"] and b["hi"] <= hi]
        if sum(b["hi"] - b["lo"] for b in part) != hi - lo:
            raise ValueError(f"edges {edges} are not unions of the fine buckets")
        n = sum(b["tokens"] for b in part)
        out.append({"lo": lo, "hi": hi, "tokens": n, "loss": sum(b["loss"] * b["tokens"] for b in part) / n})
    return out


def train_stage(name: str, run_dir: pathlib.Path, overrides: list[str]) -> float | str:
    """Train (or resume to the end of) one stage; returns its wall seconds, or "reused" when it had finished."""
    from dsv3_jax.presets import load_config
    from dsv3_jax.train import checkpoint
    from dsv3_jax.train.loop import train

    print(f"[context_extension] stage {name} -> {run_dir}", flush=True)
    cfg = load_config("small", QUIET + overrides + [f"train.run_dir={run_dir}", "train.checkpoint_every=100000"])
    done = cfg.train.steps in checkpoint.existing_steps(run_dir)
    t0 = time.perf_counter()
    train(cfg)
    return "reused" if done else time.perf_counter() - t0


def evaluate(run_dir: pathlib.Path, fields: list[str], batch_size: int, batches: int) -> list[dict]:
    """Fine position buckets of one checkpoint at LONG tokens, under `fields` (model.KEY=VALUE) when given."""
    import dataclasses

    from dsv3_jax.tools import eval as evaluation
    from dsv3_jax.train import checkpoint

    model, cfg = checkpoint.load_model(run_dir)
    if fields:
        model = evaluation.with_model_fields(model, fields)
    data = dataclasses.replace(cfg.data, seq_len=LONG)
    return evaluation.evaluate_positions(model, data, batch_size, batches, PLOT_EDGES, cfg.train.seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True, help="directory for table.md, buckets.png, results.json")
    p.add_argument("--runs", type=pathlib.Path, default=pathlib.Path("runs/context_extension"),
                   help="directory for the stages' run dirs (checkpoints)")
    p.add_argument("--short-steps", type=int, default=300)
    p.add_argument("--short-batch", type=int, default=4)
    p.add_argument("--long-steps", type=int, default=100)
    p.add_argument("--long-batch", type=int, default=1)
    p.add_argument("--control", action="store_true", help="also extend without YaRN (the same training)")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--eval-batches", type=int, default=0,
                   help="held-out batches of rows of 2,048 per condition (0: the whole held-out split)")
    p.add_argument("--replot", action="store_true", help="only redraw table.md and buckets.png from results.json")
    a = p.parse_args(argv)
    if a.replot:
        write_outputs(a.out, json.loads((a.out / "results.json").read_text())["fine"])
        return 0
    from dsv3_jax.tools import eval as evaluation  # noqa: F401  (fails before the runs if the tools are missing)
    from dsv3_jax.tools.plot import plot_position_buckets  # noqa: F401

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    short, yarn, plain = a.runs / "short", a.runs / "yarn", a.runs / "plain"
    walls = {"short": train_stage("short", short, [
        f"data.seq_len={SHORT}", f"model.max_position_embeddings={SHORT}", f"train.steps={a.short_steps}",
        f"train.global_batch_size={a.short_batch}"])}
    # the extension's learning rate: the short stage's final (cosine end) rate, constant after a short warmup
    long = [f"data.seq_len={LONG}", f"model.max_position_embeddings={LONG}", f"train.steps={a.long_steps}",
            f"train.global_batch_size={a.long_batch}", f"train.init_from={short}", "train.learning_rate=2.0e-4",
            "train.min_learning_rate=2.0e-4", "train.warmup_steps=10"]
    walls["yarn"] = train_stage("yarn", yarn, long + [YARN])
    if a.control:
        walls["plain"] = train_stage("plain", plain, long)

    wide = [f"model.max_position_embeddings={LONG}"]
    conditions = {
        f"trained at {SHORT}, no YaRN": (short, wide),
        f"trained at {SHORT}, YaRN x{LONG // SHORT}, not trained at {LONG}": (short, wide + [YARN]),
        f"+ {a.long_steps} steps at {LONG} with YaRN": (yarn, []),
    }
    if a.control:
        conditions[f"+ {a.long_steps} steps at {LONG} without YaRN"] = (plain, [])
    fine = {}
    for label, (run, fields) in conditions.items():
        print(f"[context_extension] eval: {label}", flush=True)
        fine[label] = evaluate(run, fields, a.eval_batch, a.eval_batches)
    walls["total"] = time.perf_counter() - t0
    (a.out / "results.json").write_text(json.dumps({"fine": fine, "wall_s": walls, "args": {
        k: str(v) for k, v in vars(a).items()}}, indent=1) + "\n")
    write_outputs(a.out, fine)
    print(json.dumps({"wall_s": walls}))
    return 0


def write_outputs(out: pathlib.Path, fine: dict[str, list[dict]]) -> None:
    """OUT/table.md (the coarse buckets) and OUT/buckets.png (the fine ones) of the evaluated conditions."""
    from dsv3_jax.tools import eval as evaluation
    from dsv3_jax.tools.plot import plot_position_buckets

    table = evaluation.bucket_table({k: merge(v, TABLE_EDGES) for k, v in fine.items()})
    (out / "table.md").write_text(table + "\n")
    plot_position_buckets(fine, out / "buckets.png", f"small: held-out loss by position, rows of {LONG}", mark=SHORT)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
