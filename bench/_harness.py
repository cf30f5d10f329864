"""Timing helpers shared by the benchmarks: medians over repeated batches, ratios in one run."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """The median seconds per call of one measured operation."""

    name: str
    median: float
    calls: int

    @property
    def per_second(self) -> float:
        return 1.0 / self.median if self.median else float("inf")


def measure(name: str, fn: Callable[[], object], *, calls: int = 2000, batches: int = 15) -> Timing:
    """Median per-call time of ``fn`` over ``batches`` batches, after a warm-up batch.

    Batching keeps the clock's resolution out of sub-microsecond work; the median keeps a stray
    scheduler pause on this shared machine out of the figure.
    """
    per_batch = max(1, calls // batches)
    for _ in range(per_batch):
        fn()
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(batches):
            start = time.perf_counter()
            for _ in range(per_batch):
                fn()
            samples.append((time.perf_counter() - start) / per_batch)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(name, statistics.median(samples), per_batch * batches)


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    return f"{seconds * 1e3:8.2f} ms"


def report(title: str, subject: Timing, baselines: list[Timing]) -> None:
    """Print the subject's median and its speed ratio against each baseline of the same run."""
    print(f"\n## {title}")
    rows = [subject, *baselines]
    width = max(len(t.name) for t in rows)
    for t in rows:
        line = f"  {t.name:<{width}}  median {fmt_time(t.median)}  ({t.per_second:,.0f}/s)"
        if t is not subject:
            ratio = t.median / subject.median
            # A faster baseline is a floor (raw crypto), not a rival: say how close we come.
            line += (
                f"  farebox is {ratio:5.1f}x faster"
                if ratio >= 1
                else f"  farebox takes {1 / ratio:4.2f}x its time"
            )
        print(line)
