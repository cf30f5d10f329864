"""What only the shared stores (PostgreSQL, Redis) and SQLite's migration promise."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from farebox.errors import ConfigError, PaymentError
from farebox.store import Claim, IdempotencyEntry, SqliteStore
from farebox.store.postgres import PostgresStore, applied_migrations, migrate, migrations
from farebox.store.redis import RedisStore
from farebox.store.sqlite import SCHEMA_VERSION
from tests.support.stores import REDIS_URL, drop_schema, recreate_schema, schema_dsn, worker_id

pytestmark = pytest.mark.anyio


@pytest.fixture
def fresh_schema() -> Iterator[str]:
    """A DSN on an empty schema of this worker's own, dropped afterwards."""
    schema = f"farebox_fresh_{worker_id()}"
    recreate_schema(schema)
    yield schema_dsn(schema)
    drop_schema(schema)


async def test_postgres_migrations_apply_once_in_order(fresh_schema: str) -> None:
    known = [version for version, _ in migrations()]
    assert known[0] == "0001_initial"
    assert known == sorted(known)
    assert await applied_migrations(fresh_schema) == []
    assert await migrate(fresh_schema) == known
    assert await migrate(fresh_schema) == []  # idempotent
    assert await applied_migrations(fresh_schema) == known
    with psycopg.connect(fresh_schema) as conn:
        rows = conn.execute("SELECT version, applied_at FROM farebox_migrations").fetchall()
    assert sorted(version for version, _ in rows) == known
    assert all(applied_at is not None for _, applied_at in rows)


async def test_postgres_store_refuses_an_unmigrated_database(fresh_schema: str) -> None:
    store = PostgresStore(fresh_schema)
    with pytest.raises(ConfigError, match="farebox db migrate"):
        await store.claim("k", owner="a", now=1)
    await store.aclose()
    async with await PostgresStore.open(fresh_schema, migrate=True) as migrating:
        assert await migrating.claim("k", owner="a", now=1) is not None
    assert await applied_migrations(fresh_schema) == [v for v, _ in migrations()]


async def test_postgres_refuses_a_newer_database(fresh_schema: str) -> None:
    await migrate(fresh_schema)
    with psycopg.connect(fresh_schema) as conn:
        conn.execute("INSERT INTO farebox_migrations (version) VALUES ('9999_future')")
    with pytest.raises(PaymentError, match="newer"):
        await migrate(fresh_schema)
    with pytest.raises(PaymentError, match="newer"):
        await PostgresStore.open(fresh_schema)


async def test_postgres_log_is_append_only(fresh_schema: str) -> None:
    await migrate(fresh_schema)
    with psycopg.connect(fresh_schema, autocommit=True) as conn:
        conn.execute("INSERT INTO events (kind, at) VALUES ('x', 1)")
        with pytest.raises(psycopg.Error, match="append-only"):
            conn.execute("DELETE FROM events")


async def test_unreachable_services_are_store_unavailable_without_secrets() -> None:
    for store in (
        PostgresStore("postgresql://user:hunter2@127.0.0.1:1/db", timeout=1),
        RedisStore("redis://:hunter2@127.0.0.1:1/0", timeout=1),
    ):
        with pytest.raises(PaymentError) as failed:
            await store.claim("k", owner="a", now=1)
        assert failed.value.code == "store_unavailable"
        assert failed.value.status == 503
        assert "hunter2" not in str(failed.value)
        assert "hunter2" not in json.dumps(failed.value.to_problem())
        assert "hunter2" not in repr(store)
        await store.aclose()


async def test_sqlite_migrates_a_version_1_file(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL,"
            " at INTEGER NOT NULL, txn TEXT) WITHOUT ROWID"
        )
        conn.execute("INSERT INTO claims VALUES ('k', 'o', 'pending', 5, '0x1')")
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    async with await SqliteStore.open(path) as store:
        assert await store.unfinished(held_before=0) == [Claim("k", "o", "pending", 5, "0x1")]
        assert await store.begin_idempotent("i", fingerprint="f", owner="o", now=1) is None


async def test_sqlite_migrates_a_version_2_file_keeping_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,"
            " owner TEXT NOT NULL, at INTEGER NOT NULL, status INTEGER, headers TEXT,"
            " body BLOB) WITHOUT ROWID"
        )
        conn.execute(
            "INSERT INTO idempotency (key, fingerprint, owner, at) VALUES ('i', 'f', 'o', 3)"
        )
        conn.execute("PRAGMA user_version = 2")
    conn.close()
    async with await SqliteStore.open(path) as store:
        # An entry from before the column reads as one whose claim is unknown.
        assert await store.get_idempotent("i") == IdempotencyEntry("i", "f", "o", 3)
        assert (
            await store.begin_idempotent("j", fingerprint="f", owner="o", now=4, claim="c") is None
        )
        assert (await store.get_idempotent("j")) == IdempotencyEntry("j", "f", "o", 4, claim="c")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


async def test_postgres_migration_0003_keeps_entries_without_a_claim(fresh_schema: str) -> None:
    # The database as a farebox before 0003 left it, with an entry in it.
    older = [(version, sql) for version, sql in migrations() if version < "0003"]
    with psycopg.connect(fresh_schema, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE farebox_migrations (version TEXT PRIMARY KEY,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for version, sql in older:
            conn.execute(sql.encode())
            conn.execute("INSERT INTO farebox_migrations (version) VALUES (%s)", (version,))
        conn.execute(
            "INSERT INTO idempotency (key, fingerprint, owner, at) VALUES ('i', 'f', 'o', 3)"
        )
    assert await migrate(fresh_schema) == [v for v, _ in migrations() if v >= "0003"]
    async with await PostgresStore.open(fresh_schema) as store:
        assert await store.get_idempotent("i") == IdempotencyEntry("i", "f", "o", 3)


async def test_redis_reads_entries_written_without_a_claim(redis_prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.set(f"{redis_prefix}idem:i", json.dumps({"fingerprint": "f", "owner": "o", "at": 3}))
    finally:
        client.close()
    async with await RedisStore.open(REDIS_URL, prefix=redis_prefix) as store:
        assert await store.get_idempotent("i") == IdempotencyEntry("i", "f", "o", 3)


CHILD = textwrap.dedent(
    """
    import json, sys
    import anyio
    from farebox.store.postgres import PostgresStore
    from farebox.store.redis import RedisStore

    async def main(kind, target, extra, name):
        if kind == "postgres":
            store = await PostgresStore.open(target)
        else:
            store = await RedisStore.open(target, prefix=extra)
        print("ready", flush=True)
        sys.stdin.readline()
        won = []
        async with anyio.create_task_group() as tg:
            async def one(n):
                if await store.claim("the-key", owner=f"{name}-{n}", now=1) is not None:
                    won.append("the-key")
                entry = await store.begin_idempotent(
                    "the-idem", fingerprint="f", owner=f"{name}-{n}", now=1
                )
                if entry is None:
                    won.append("the-idem")
            for n in range(50):
                tg.start_soon(one, n)
        await store.aclose()
        print(json.dumps(won), flush=True)

    anyio.run(main, *sys.argv[1:])
    """
)


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_two_processes_racing_have_one_winner(kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "postgres":
        target, extra = request.getfixturevalue("empty_postgres"), ""
    else:
        target, extra = REDIS_URL, request.getfixturevalue("redis_prefix")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, kind, target, extra, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("p1", "p2")
    ]
    for child in children:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    won: list[str] = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        won += json.loads(out)
    assert sorted(won) == ["the-idem", "the-key"]
