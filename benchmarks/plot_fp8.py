"""Loss curves of two or more runs from their metrics.jsonl, one PNG, and the numbers docs/fp8.md quotes: the final
train loss (last logged step, and the mean of the last `--tail` logged steps, single batches being noisy), the final
held-out loss, and each run's relative gap to the first run, also paired step by step over the second half of the
run (same data order, so the batch-to-batch noise cancels).

    python benchmarks/plot_fp8.py runs/bf16 runs/fp8 --out docs/fp8_loss.png
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(run: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run, in step order."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=pathlib.Path)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/fp8_loss.png"))
    p.add_argument("--tail", type=int, default=5)
    a = p.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    summary, curves = [], []
    for run in a.runs:
        train, evals = read(run)
        curves.append({r["step"]: r["loss"] for r in train})
        line, = ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=f"{run.name} train")
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o--", color=line.get_color(),
                label=f"{run.name} held-out")
        tail = [r["loss"] for r in train[-a.tail:]]
        summary.append((run.name, train[-1]["step"], train[-1]["loss"], sum(tail) / len(tail), evals[-1]["loss"]))
    ax.set(xlabel="step", ylabel="next-token loss (nats)", ylim=(None, min(4.0, ax.get_ylim()[1])))
    ax.grid(alpha=0.3)
    ax.legend()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(a.out)
    print(f"wrote {a.out}")
    print(f"| run | steps | final train loss | mean of last {a.tail} logged | held-out loss | gap vs {summary[0][0]}: "
          "last / mean / held-out / paired 2nd half |")
    print("| --- | --- | --- | --- | --- | --- |")
    _, _, base_last, base_tail, base_eval = summary[0]
    for (name, step, last, tail, held), curve in zip(summary, curves, strict=True):
        half = [s for s in curves[0] if s > step // 2 and s in curve]
        paired = sum(curve[s] for s in half) / sum(curves[0][s] for s in half) - 1
        gap = (f"{100 * (last / base_last - 1):+.2f}% / {100 * (tail / base_tail - 1):+.2f}% / "
               f"{100 * (held / base_eval - 1):+.2f}% / {100 * paired:+.2f}%")
        print(f"| {name} | {step} | {last:.4f} | {tail:.4f} | {held:.4f} | {gap} |")


if __name__ == "__main__":
    main()
