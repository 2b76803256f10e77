"""PNG plots from one or more runs' metrics.jsonl (matplotlib, Agg): several runs are overlaid, labelled by name.

    python -m dsv3_jax.tools.plot runs/a runs/b --out plots/

Writes loss.png (train, held-out and MTP loss), maxvio.png (mean over MoE layers of the per-batch MaxVio),
load_<run>.png (per-layer expert load c_i / mean(c) over steps) and bias_<run>.png (router bias trajectories; flat
at zero for runs that do not use the bias rule). The per-layer matrices come from the trainer's `expert_load` and
`router_bias` metrics; runs logged before those existed get the line plots only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import TYPE_CHECKING

from dsv3_jax.data import atomic
from dsv3_jax.errors import ArgumentParser, DataError, UsageError, require, run_command

if TYPE_CHECKING:
    import numpy as np

# matplotlib, numpy and the metrics module (jax) load inside the functions that use them: a Ctrl-C while the
# command starts up then lands inside errors.run_command (one line, 130), not in a module-level import


def pyplot():
    """matplotlib's pyplot on the Agg backend; MissingExtra (one line) when the `plot` extra is not installed."""
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_info(run_dir: str | pathlib.Path) -> tuple[list[dict], dict]:
    """(metrics records, saved run config dict) of a run dir; one-line errors for what is missing."""
    from dsv3_jax.train import metrics

    records = metrics.read_records(run_dir)
    cfg_path = pathlib.Path(run_dir) / "run_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no run_config.json (not a training run dir)")
    try:
        return records, json.loads(cfg_path.read_text())
    except ValueError:
        raise DataError(f"{cfg_path}: not JSON (a cut-off or edited run_config.json)") from None


def load_history(records: list[dict], name: str, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps (S,), matrices (S, L, E)) of a logged per-layer metric over the train records."""
    import numpy as np

    from dsv3_jax.train import metrics

    rows = [(r["step"], metrics.layer_matrix(r, name, num_experts)) for r in records
            if r.get("kind") == "train" and f"{name}/0" in r]
    if not rows:
        return np.zeros((0,), np.int64), np.zeros((0, 0, num_experts))
    return np.array([s for s, _ in rows]), np.stack([m for _, m in rows])


def _line_plot(ax, runs: dict, kind: str, key: str, style: str = "-", label_suffix: str = "",
               mtp_only: bool = False) -> bool:
    """One line per run (colour C<i> by run order, so a run keeps its colour across panels)."""
    from dsv3_jax.train import metrics

    drawn = False
    for i, (label, (records, cfg)) in enumerate(runs.items()):
        if mtp_only and not cfg["model"].get("num_nextn_predict_layers"):
            continue
        steps, values = metrics.series(records, kind, key)
        if len(steps):
            ax.plot(steps, values, style, color=f"C{i % 10}", label=label + label_suffix)
            drawn = True
    return drawn


def plot_runs(run_dirs: list[str], out: str | pathlib.Path, labels: list[str] | None = None) -> list[pathlib.Path]:
    """Write the PNGs for these runs into `out`; returns their paths."""
    plt = pyplot()
    labels = labels or [pathlib.Path(d).name for d in run_dirs]
    runs = {label: run_info(d) for label, d in zip(labels, run_dirs)}
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        atomic.write_with(out / name, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
        plt.close(fig)
        written.append(out / name)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    _line_plot(axes[0], runs, "train", "loss", "-", " train")
    _line_plot(axes[0], runs, "eval", "loss", "o--", " held-out")
    axes[0].set(title="next-token loss (nats/token)", xlabel="step")
    if not _line_plot(axes[1], runs, "train", "mtp_loss", mtp_only=True):
        axes[1].text(0.5, 0.5, "no MTP", ha="center", transform=axes[1].transAxes)
    axes[1].set(title="MTP loss (depth mean, nats/token)", xlabel="step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    _line_plot(ax, runs, "train", "maxvio_mean")
    ax.set(title="MaxVio per batch (mean over MoE layers)", xlabel="step", yscale="log")
    ax.legend(fontsize=7)
    save(fig, "maxvio.png")

    for label, (records, cfg) in runs.items():
        e = cfg["model"]["n_routed_experts"]
        for name, title, fname in (("expert_load", "expert load c_i / mean(c)", "load"),
                                   ("router_bias", "router bias", "bias")):
            steps, mats = load_history(records, name, e)
            if not len(steps) or not mats.shape[1]:
                continue
            n_layers = mats.shape[1]
            fig, axes = plt.subplots(1, n_layers, figsize=(4.5 * n_layers, 3.5), squeeze=False)
            for layer, ax in enumerate(axes[0]):
                if name == "expert_load":
                    im = ax.imshow(mats[:, layer].T, aspect="auto", origin="lower", cmap="viridis",
                                   extent=(steps[0], steps[-1], -0.5, e - 0.5), vmin=0, vmax=3.0)
                    fig.colorbar(im, ax=ax)
                    ax.set(ylabel="expert")
                else:
                    ax.plot(steps, mats[:, layer], lw=0.6)
                ax.set(title=f"{label}: MoE layer {layer}", xlabel="step")
            fig.suptitle(f"{title} ({label})")
            save(fig, f"{fname}_{label}.png")
    return written


def plot_position_buckets(rows: dict[str, list[dict]], path: str | pathlib.Path, title: str,
                          mark: int | None = None) -> pathlib.Path:
    """One line per evaluated condition: held-out loss against in-document position (the buckets of
    `eval.evaluate_model(position_buckets=...)`, drawn as steps over each bucket's [lo, hi)); `mark` draws a
    dashed line at a position (the trained context length)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, buckets) in enumerate(rows.items()):
        x = [b["lo"] for b in buckets] + [buckets[-1]["hi"]]
        y = [b["loss"] for b in buckets]
        ax.stairs(y, x, baseline=None, color=f"C{i % 10}", lw=1.8, label=label)
    if mark is not None:
        ax.axvline(mark, color="grey", ls="--", lw=0.8, label=f"position {mark}")
    ax.set(title=title, xlabel="in-document position of the input token", ylabel="held-out loss (nats/token)",
           xlim=(0, rows[next(iter(rows))][-1]["hi"]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m dsv3_jax.tools.plot", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--labels", help="comma-separated labels, one per run (default: the run dir names)")
    args = p.parse_args(argv)
    pyplot()  # the missing extra before anything else
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.run_dirs):
        raise UsageError(f"--labels has {len(labels)} names for {len(args.run_dirs)} run dirs")
    for path in plot_runs(args.run_dirs, args.out, labels):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
