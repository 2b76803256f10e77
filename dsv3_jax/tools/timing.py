"""Timing helpers of the benchmarks: medians after a warm-up, paired (alternating) medians, table rows."""

from __future__ import annotations

import statistics
import time


def median_s(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() (which must block until its result is ready) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_medians_s(fa, fb, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of fa() and fb(), timed alternately (a, b, a, b, ...) so that both see the same load from
    other jobs on the machine; `warmup` calls of each first."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def row(name: str, ours: float, reference: float | None, unit: str, higher_is_better: bool = True, **extra) -> dict:
    """One table row; ratio = how many times better ours is (ours/ref for rates, ref/ours for times); `extra` keys
    ride along (acceptance, identical rows)."""
    if reference is None:
        ratio = None
    else:
        ratio = ours / reference if higher_is_better else reference / ours
    return {"name": name, "ours": ours, "reference": reference, "ratio": ratio, "unit": unit, **extra}
