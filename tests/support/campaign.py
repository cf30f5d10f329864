"""The bad-input campaign's tally: how many inputs each target was fed (``tests/campaign/conftest.py``
prints the totals at the end of the session)."""

from __future__ import annotations

from collections import Counter

__all__ = ["TRIED", "tried"]

TRIED: Counter[str] = Counter()


def tried(target: str, n: int = 1) -> None:
    """Count ``n`` inputs fed to ``target``."""
    TRIED[target] += n
