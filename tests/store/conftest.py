"""The ``store`` fixture: every protocol test runs over memory, SQLite, PostgreSQL and Redis.

The backends and their isolation under xdist are described in ``tests/support/stores.py``; the
PostgreSQL schema and the Redis key prefix come from the fixtures of ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from farebox.store import Store
from tests.support.stores import BACKENDS, store_factory


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh, empty store of each backend."""
    made = store_factory(request.param, request, tmp_path)()
    yield made
    await made.aclose()
