"""The bad-input campaign: counts the inputs each target was fed, and prints the totals.

Run ``pytest tests/campaign -s -p no:xdist`` to see the table (under xdist each worker counts its
own share and the table is not shown).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.campaign import TRIED


@pytest.fixture(scope="session", autouse=True)
def _campaign_totals() -> Iterator[None]:
    yield
    if TRIED:
        width = max(map(len, TRIED))
        lines = [f"  {name:<{width}}  {count:>7}" for name, count in sorted(TRIED.items())]
        total = sum(TRIED.values())
        print("\nbad-input campaign, inputs tried per target:\n" + "\n".join(lines))
        print(f"  {'total':<{width}}  {total:>7}")
