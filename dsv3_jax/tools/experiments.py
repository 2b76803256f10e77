"""Matched small-scale runs that test two of the report's design claims, with a markdown table and plots.

    python -m dsv3_jax.tools.experiments balance --out docs/experiments/balance      # aux_free vs aux_loss vs none
    python -m dsv3_jax.tools.experiments mtp --out docs/experiments/mtp                    # MTP depth 0 vs 1
    python -m dsv3_jax.tools.experiments balance --quick --out /tmp/balance                # a few minutes

Every arm trains the same preset (configs/exp.yaml) on the same data for the same steps; seed s gives every arm the
same initialisation and batch order, so arms differ only in what is compared. After training, each run is
evaluated on held-out text (`eval.evaluate_model`) and, for MTP runs, greedy speculative decoding measures the draft
acceptance (`sampling.generate(speculative="mtp")`); both are appended to the run's metrics.jsonl as a `heldout`
record, and the table is computed from the runs' metrics.jsonl files alone (`table`). A finished run (one with a
heldout record) is reused when the command is rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np

from dsv3_jax.errors import ArgumentParser, ConfigError, require, run_command

PRESET = "exp"


# Each arm: (name, config overrides). Both aux-loss weights are conventional Switch/GShard values.
ARMS = {
    "balance": [("aux_free", ["train.balance=aux_free"]),
                ("aux_loss_1e-3", ["train.balance=aux_loss", "train.aux_loss_alpha=1e-3"]),
                ("aux_loss_1e-2", ["train.balance=aux_loss", "train.aux_loss_alpha=1e-2"]),
                ("none", ["train.balance=none"])],
    "mtp": [("mtp_depth_0", ["model.num_nextn_predict_layers=0"]),
            ("mtp_depth_1", ["model.num_nextn_predict_layers=1"])],
}


# The config fields an arm (or a seed) may change; everything else must match across the runs of one comparison.
VARIES = {"balance": {"train.balance", "train.aux_loss_alpha"}, "mtp": {"model.num_nextn_predict_layers"}}


PER_RUN = {"train.seed", "train.run_dir"}


QUICK = ["train.steps=30", "train.eval_every=30", "train.log_every=5", "train.checkpoint_every=30"]


SPEC_PROMPTS, SPEC_PROMPT_LEN, SPEC_NEW_TOKENS = 4, 32, 64


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_dirs_of(out: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in (out / "arm_runs").glob("*__s*") if p.is_dir())


def arm_and_seed(run_dir: pathlib.Path) -> tuple[str, int]:
    arm, seed = run_dir.name.rsplit("__s", 1)
    return arm, int(seed)


def heldout(records: list[dict]) -> dict | None:
    rows = [r for r in records if r.get("kind") == "heldout"]
    return rows[-1] if rows else None


def spec_acceptance(model, data_cfg, seed: int) -> float:
    """Greedy speculative decoding (MTP drafts) from held-out prompts: accepted drafts / drafts."""
    from dsv3_jax.data import pipeline
    from dsv3_jax.infer.sampling import generate

    rows = next(iter(pipeline.make_dataset(data_cfg, "eval", SPEC_PROMPTS, seed=seed)))["tokens"]
    prompts = [list(map(int, r[:SPEC_PROMPT_LEN])) for r in rows]
    res = generate(model, prompts, SPEC_NEW_TOKENS, temperature=0.0, speculative="mtp")
    return float(res.acceptance) if res.acceptance is not None else math.nan


def run_one(preset: str, overrides: list[str], run_dir: pathlib.Path, eval_batches: int) -> dict:
    """Train one arm/seed (unless already finished), evaluate it, append the heldout record; returns it."""
    from dsv3_jax.presets import load_config
    from dsv3_jax.tools import eval as evaluation
    from dsv3_jax.train import checkpoint, metrics
    from dsv3_jax.train.loop import train

    if (run_dir / "metrics.jsonl").is_file():
        done = heldout(metrics.read_records(run_dir))
        if done is not None:
            return done
    cfg = load_config(preset, overrides + [f"train.run_dir={run_dir}", "train.sample_tokens=0",
                                           "train.tensorboard=false", "train.progress=false"])
    t0 = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - t0
    model, cfg = checkpoint.load_model(run_dir)
    rec = evaluation.evaluate_model(model, cfg.data, cfg.train.global_batch_size, eval_batches, cfg.train.seed)
    if cfg.model.num_nextn_predict_layers:
        rec["spec_acceptance"] = spec_acceptance(model, cfg.data, cfg.train.seed)
    rec.update(train_s=train_s, wall_s=time.perf_counter() - t0)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": cfg.train.steps, "kind": "heldout", **rec}) + "\n")
    return rec


def check_matched(kind: str, run_dirs: list[pathlib.Path]) -> None:
    """All runs of one comparison share every config field except the arm's and the seed's (one-line error)."""
    allowed = VARIES[kind] | PER_RUN
    ref_dir, ref = None, None
    for d in run_dirs:
        path = d / "run_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d} has no run_config.json (not a training run dir)")
        flat = {k: v for k, v in _flatten(json.loads(path.read_text())).items() if k not in allowed}
        if ref is None:
            ref_dir, ref = d, flat
            continue
        for k in sorted(set(ref) | set(flat)):
            if ref.get(k) != flat.get(k):
                raise ConfigError(f"mismatched runs in one comparison: {ref_dir.name} and {d.name} differ in {k} "
                                  f"({ref.get(k)!r} vs {flat.get(k)!r})")


def _stat(values: list[float], digits: int = 3) -> str:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if not len(v):
        return "-"
    spread = f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else ""
    return f"{v.mean():.{digits}f}{spread}"


def train_maxvio(records: list[dict], tail: float = 0.25) -> float:
    """Mean per-batch MaxVio (mean over layers) over the last `tail` of the logged training steps."""
    from dsv3_jax.train import metrics

    steps, values = metrics.series(records, "train", "maxvio_mean")
    if not len(steps):
        return math.nan
    return float(values[steps >= steps.max() - tail * steps.max()].mean())


def collect(kind: str, out: pathlib.Path) -> dict[str, list[tuple[int, list[dict], dict]]]:
    """{arm: [(seed, records, heldout record)]} of the finished runs under out/arm_runs, in ARMS order."""
    from dsv3_jax.train import metrics

    run_dirs = [d for d in run_dirs_of(out) if arm_and_seed(d)[0] in dict(ARMS[kind])]
    if not run_dirs:
        raise FileNotFoundError(f"{out / 'arm_runs'} holds no {kind} runs")
    check_matched(kind, run_dirs)
    by_arm: dict = {arm: [] for arm, _ in ARMS[kind]}
    for d in run_dirs:
        records = metrics.read_records(d)
        h = heldout(records)
        if h is None:
            raise ConfigError(f"run {d} has no heldout record in metrics.jsonl (unfinished; rerun the experiment)")
        arm, seed = arm_and_seed(d)
        by_arm[arm].append((seed, records, h))
    steps = {len([r for r in recs if r.get("kind") == "train"]) for runs in by_arm.values() for _, recs, _ in runs}
    if len(steps) > 1:
        raise ConfigError(f"mismatched runs in one comparison: they logged different numbers of steps {sorted(steps)}")
    return {a: sorted(r, key=lambda x: x[0]) for a, r in by_arm.items() if r}


def table(kind: str, out: pathlib.Path) -> str:
    """The markdown table of an experiment: mean ± sample std over seeds per arm, from metrics.jsonl only."""
    by_arm = collect(kind, out)
    if kind == "balance":
        n_layers = max(len([k for k in h if k.startswith("maxvio_global/")]) for runs in by_arm.values()
                       for _, _, h in runs)
        head = (["arm", "seeds", "held-out bits/byte", "MaxVio_global (mean of layers)"]
                + [f"MaxVio_global layer {i}" for i in range(n_layers)] + ["MaxVio_batch (train, last 25%)"])
        rows = []
        for arm, runs in by_arm.items():
            hs = [h for _, _, h in runs]
            glob = [np.mean([h[f"maxvio_global/{i}"] for i in range(n_layers)]) for h in hs]
            rows.append([arm, str(len(runs)), _stat([h["bits_per_byte"] for h in hs], 4), _stat(glob)]
                        + [_stat([h[f"maxvio_global/{i}"] for h in hs]) for i in range(n_layers)]
                        + [_stat([train_maxvio(r) for _, r, _ in runs])])
    else:
        head = ["arm", "seeds", "held-out loss (nats/token)", "held-out bits/byte", "next-token accuracy",
                "MTP head accuracy (token t+2)", "speculative acceptance (greedy)"]
        rows = []
        for arm, runs in by_arm.items():
            hs = [h for _, _, h in runs]
            rows.append([arm, str(len(runs)), _stat([h["loss"] for h in hs], 4),
                         _stat([h["bits_per_byte"] for h in hs], 4), _stat([h["accuracy"] for h in hs]),
                         _stat([h.get("mtp1_accuracy") for h in hs]), _stat([h.get("spec_acceptance") for h in hs])])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_experiment(kind: str, out: pathlib.Path, seeds: int, quick: bool, preset: str = PRESET,
                   extra: list[str] = (), eval_batches: int = 8) -> str:
    """Train every arm x seed, then write out/table.md and the plots; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for seed in range(seeds):
        for arm, overrides in ARMS[kind]:
            run_dir = out / "arm_runs" / f"{arm}__s{seed}"
            print(f"[{kind}] {arm} seed {seed} -> {run_dir}", flush=True)
            run_one(preset, overrides + (QUICK if quick else []) + list(extra) + [f"train.seed={seed}"], run_dir,
                    eval_batches)
    wall = time.perf_counter() - t0
    from dsv3_jax.data import atomic
    from dsv3_jax.tools.plot import plot_runs

    text = table(kind, out)
    atomic.write_text(out / "table.md", text + "\n")

    dirs = [d for d in run_dirs_of(out) if arm_and_seed(d)[0] in dict(ARMS[kind])]
    plot_runs([str(d) for d in dirs], out / "plots", [d.name for d in dirs])
    atomic.write_text(out / "wall_time.json", json.dumps({"wall_s": wall, "runs": len(dirs)}) + "\n")
    return text


def enable_compile_cache(path: str = "~/.cache/dsv3_jax/jax_compile") -> None:
    """Persist compiled steps on disk: the seeds of one arm compile the same programs, so only the first pays."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m dsv3_jax.tools.experiments", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("kind", help="balance | mtp")
    p.add_argument("--out", required=True, help="directory for arm_runs/, table.md and plots/")
    p.add_argument("--seeds", type=int, default=2, help="seeds per arm (>= 2 for a spread)")
    p.add_argument("--quick", action="store_true", help="30 steps per run: a smoke test in a few minutes")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per run")
    p.add_argument("--preset", default=PRESET, help="config preset (default: exp)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every arm")
    args = p.parse_intermixed_args(argv)
    require("matplotlib", "plot")  # the plots come last: fail before the runs, not after them
    if args.kind not in ARMS:
        raise ConfigError(f"unknown experiment {args.kind!r}; choose one of {list(ARMS)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if pathlib.Path(args.out).exists() and not pathlib.Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file, not a directory")
    enable_compile_cache()
    print(run_experiment(args.kind, pathlib.Path(args.out), args.seeds, args.quick, args.preset, args.overrides,
                         args.eval_batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
