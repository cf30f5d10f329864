"""Fixtures of the facilitator tests: the service's own store on each backend.

The store helpers are the store tests' (``tests/store/conftest.py``); PostgreSQL gets a schema of
this directory's own per xdist worker, so that neither suite drops the other's tables.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from farebox.store import Store
from farebox.store.postgres import migrate
from tests.store.conftest import (
    drop_schema,
    empty_postgres,
    recreate_schema,
    redis_prefix,
    run_outside_the_loop,
    schema_dsn,
    store_factory,
    worker_id,
)

__all__ = ["empty_postgres", "postgres_dsn", "redis_prefix", "service_store"]

SERVICE_BACKENDS = ("memory", "sqlite", "postgres", "redis")


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A DSN on a migrated schema of this worker's facilitator tests."""
    schema = f"farebox_facilitator_{worker_id()}"
    recreate_schema(schema)
    dsn = schema_dsn(schema)
    run_outside_the_loop(migrate, dsn)
    yield dsn
    drop_schema(schema)


@pytest.fixture(params=SERVICE_BACKENDS)
async def service_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh, empty store of each backend, for the service to record its claims in."""
    made = store_factory(request.param, request, tmp_path)()
    yield made
    await made.aclose()
