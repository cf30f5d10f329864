"""Run every benchmark: `make bench` (or `python -m bench` from the repository root)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = [
    "bench.bench_verify",
    "bench.bench_receipts",
    "bench.bench_gate",
    "bench.bench_facilitator",
    "bench.bench_card",
]


def main(names: list[str]) -> None:
    for name in names or BENCHMARKS:
        importlib.import_module(name if name.startswith("bench.") else f"bench.{name}").run()


if __name__ == "__main__":
    main(sys.argv[1:])
