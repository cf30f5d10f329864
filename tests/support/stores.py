"""The stores under test on every backend: memory, SQLite, PostgreSQL and Redis.

PostgreSQL and Redis are services (``.ci/run`` starts them). A test that needs one fails when it
is down, never skips: a suite that silently stops testing the shared stores is worse than a red
one. The addresses come from ``FAREBOX_TEST_POSTGRES_URL`` and ``FAREBOX_TEST_REDIS_URL``.

Isolation under pytest-xdist: each worker has its own PostgreSQL schema (``farebox_test_<worker>``,
migrated once per worker, emptied before each test, dropped at the end) and each test its own
Redis key prefix (deleted after the test); the fixtures doing that are in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import anyio
import psycopg
import pytest
import redis

from farebox.store import MemoryStore, SqliteStore, Store
from farebox.store.postgres import PostgresStore, migrate
from farebox.store.redis import RedisStore

__all__ = [
    "BACKENDS",
    "POSTGRES_URL",
    "REDIS_URL",
    "StoreFactory",
    "drop_schema",
    "empty_tables",
    "migrated_schema",
    "recreate_schema",
    "redis_key_prefix",
    "run_outside_the_loop",
    "schema_dsn",
    "store_factory",
    "worker_id",
]

POSTGRES_URL = os.environ.get(
    "FAREBOX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("FAREBOX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

BACKENDS = ("memory", "sqlite", "postgres", "redis")

T = TypeVar("T")


def worker_id() -> str:
    """This xdist worker's name (``gw0``...), or ``main`` without xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def schema_dsn(schema: str) -> str:
    """:data:`POSTGRES_URL` with ``schema`` first in the search path."""
    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"


def recreate_schema(schema: str) -> None:
    """Drop ``schema`` (with everything in it) and create it empty."""
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{schema}"')


def drop_schema(schema: str) -> None:
    """Drop ``schema`` with everything in it."""
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def run_outside_the_loop(function: Callable[[str], Awaitable[T]], argument: str) -> T:
    """``anyio.run(function, argument)`` in a thread of its own: the caller may be in a loop
    (a session fixture is first set up wherever a test needs it, maybe in an async fixture)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(anyio.run, function, argument).result()


StoreFactory = Callable[[], Store]


def store_factory(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Makes stores of ``backend`` that share one place (a file, a schema, a key prefix)."""
    if backend == "memory":
        return MemoryStore
    if backend == "sqlite":
        return lambda: SqliteStore(tmp_path / "data" / "store.db")
    if backend == "postgres":
        dsn: str = request.getfixturevalue("empty_postgres")
        return lambda: PostgresStore(dsn, max_size=4)
    if backend == "redis":
        prefix: str = request.getfixturevalue("redis_prefix")
        return lambda: RedisStore(REDIS_URL, prefix=prefix)
    raise AssertionError(backend)


@contextmanager
def migrated_schema(schema: str) -> Iterator[str]:
    """A DSN on ``schema``, created empty and migrated; dropped when the block ends."""
    recreate_schema(schema)
    dsn = schema_dsn(schema)
    run_outside_the_loop(migrate, dsn)
    yield dsn
    drop_schema(schema)


def empty_tables(dsn: str) -> str:
    """``dsn``, with its tables emptied (faster than migrating for each test)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        # TRUNCATE fires no row trigger: the log's append-only guard does not stop it.
        conn.execute(
            "TRUNCATE claims, events, idempotency, invoices, traffic_counts RESTART IDENTITY"
        )
    return dsn


@contextmanager
def redis_key_prefix() -> Iterator[str]:
    """A key prefix of its own; its keys are deleted when the block ends."""
    prefix = f"farebox-test:{worker_id()}:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
