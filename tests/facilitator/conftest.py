"""Fixtures of the facilitator tests: the service's own store on each backend.

The store helpers are the store tests' (``tests/support/stores.py``); PostgreSQL gets a schema of
this directory's own per xdist worker, so that neither suite drops the other's tables: this
``postgres_dsn`` overrides the one of ``tests/conftest.py`` here, for ``empty_postgres`` too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from farebox.store import Store
from tests.support.stores import migrated_schema, store_factory, worker_id

SERVICE_BACKENDS = ("memory", "sqlite", "postgres", "redis")


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A DSN on a migrated schema of this worker's facilitator tests."""
    with migrated_schema(f"farebox_facilitator_{worker_id()}") as dsn:
        yield dsn


@pytest.fixture(params=SERVICE_BACKENDS)
async def service_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh, empty store of each backend, for the service to record its claims in."""
    made = store_factory(request.param, request, tmp_path)()
    yield made
    await made.aclose()
