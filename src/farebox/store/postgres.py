"""A store in PostgreSQL: claims and the log shared by every process on every host of a server.

Needs the ``postgres`` extra (``psycopg[binary,pool]`` 3) and an asyncio event loop (psycopg's
async connections do not run under trio).

The schema is created by versioned SQL files (``farebox/store/migrations/postgres/*.sql``),
applied in order by :func:`migrate` (the ``farebox db migrate`` command): one transaction, under
an advisory lock so that concurrent deployments apply each file once, each recorded in the
``farebox_migrations`` table. The store never changes a schema on its own unless asked: by default
it refuses, with a :class:`~farebox.errors.ConfigError` saying to run ``farebox db migrate``, a
database whose migrations are missing (schema changes belong to a deployment step, run once with
a role allowed to make them, not to every worker at startup); ``PostgresStore(dsn, migrate=True)``
migrates on first use instead, for tests and single-host setups.

The tables live in the first schema of the connection's ``search_path``; to keep several stores
in one database, give each its schema in the DSN (``...?options=-csearch_path%3Dmy_schema``).

Every psycopg failure becomes :func:`~farebox.store.sqlite.store_unavailable` (status 503) with
the original error as ``__cause__``; no message names the DSN, which may hold a password.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from importlib import resources
from typing import Any, Literal, NamedTuple

import psycopg
from psycopg_pool import AsyncConnectionPool

from farebox.errors import ConfigError, PaymentError
from farebox.store.base import (
    INVOICE_CLAIM_PREFIX,
    Claim,
    ClaimState,
    Event,
    IdempotencyEntry,
    Invoice,
    StoredResponse,
    TrafficCount,
    check_finish_state,
    claim_not_held,
    clamp_limit,
    decode_event_data,
    encode_event_data,
    invoice_conflict,
    invoice_id_ok,
    payer_key,
    traffic_tally,
)
from farebox.store.sql import (
    events_query,
    invoice_from_row,
    invoice_row,
    invoice_statements,
    traffic_statements,
)
from farebox.store.sqlite import decode_headers, encode_headers, store_unavailable

__all__ = ["MIGRATIONS_TABLE", "PostgresStore", "applied_migrations", "migrate", "migrations"]

#: The table that records which migration files were applied, and when.
MIGRATIONS_TABLE = "farebox_migrations"

# pg_advisory_xact_lock takes a bigint: a fixed one, so that every farebox process agrees on it.
# It is per database, so migrations of two schemas in one database wait for each other (briefly).
_MIGRATION_LOCK = 0x66617265626F78  # "farebox"

_CREATE_MIGRATIONS_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
    "version TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
)

_CLAIM = (
    "INSERT INTO claims (key, owner, state, at) VALUES (%s, %s, 'held', %s) "
    "ON CONFLICT (key) DO NOTHING"
)
_RELEASE = "DELETE FROM claims WHERE key = %s AND owner = %s AND state = 'held'"
_FINISH = "UPDATE claims SET state = %s, txn = %s WHERE key = %s AND owner = %s AND state = 'held'"
_GET_CLAIM = "SELECT key, owner, state, at, txn FROM claims WHERE key = %s"
_UNFINISHED = (
    "SELECT key, owner, state, at, txn FROM claims "
    "WHERE state <> 'settled' AND (state = 'pending' OR at < %s) ORDER BY at, key LIMIT %s"
)
_RESOLVE_SETTLED = (
    "UPDATE claims SET state = 'settled', txn = %s WHERE key = %s AND state IN ('held', 'pending')"
)
_RESOLVE_FAILED = "DELETE FROM claims WHERE key = %s AND state IN ('held', 'pending')"
_INSERT_EVENT = (
    "INSERT INTO events (kind, at, route, payer, payer_key, reference, data) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
_BEGIN_IDEMPOTENT = (
    "INSERT INTO idempotency (key, fingerprint, owner, at, claim) VALUES (%s, %s, %s, %s, %s) "
    "ON CONFLICT (key) DO NOTHING"
)
_GET_IDEMPOTENT = (
    "SELECT key, fingerprint, owner, at, status, headers, body, claim FROM idempotency "
    "WHERE key = %s"
)
_COMPLETE_IDEMPOTENT = (
    "UPDATE idempotency SET status = %s, headers = %s, body = %s "
    "WHERE key = %s AND owner = %s AND status IS NULL"
)
_ABANDON_IDEMPOTENT = "DELETE FROM idempotency WHERE key = %s AND owner = %s AND status IS NULL"
_REOPEN_IDEMPOTENT = (
    "UPDATE idempotency SET owner = %s, at = %s, claim = %s, status = NULL, headers = NULL, "
    "body = NULL WHERE key = %s AND owner = %s AND status IS NOT NULL"
)
_ADD_INVOICE, _GET_INVOICE, _FIND_INVOICE, _PRUNE_INVOICES = invoice_statements("%s")
_TRAFFIC = traffic_statements("%s")

# begin_idempotent inserts, and on a conflict reads the entry; an entry abandoned between the two
# makes the read come back empty and the insert is tried again. Each round needs another request
# to start and abandon the key in between, so a few rounds are plenty.
_BEGIN_ATTEMPTS = 8


def migrations() -> list[tuple[str, str]]:
    """Every PostgreSQL migration this farebox knows: ``(version, sql)`` in the order to apply.

    The version is the file name without ``.sql`` (``"0001_initial"``).
    """
    folder = resources.files("farebox.store").joinpath("migrations", "postgres")
    found = [
        (entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found)


def _connect_timeout(timeout: float) -> int:
    # libpq takes whole seconds, and reads 0 as "wait forever".
    return max(1, math.ceil(timeout))


async def migrate(dsn: str, *, timeout: float = 10.0) -> list[str]:
    """Apply the migrations the database at ``dsn`` lacks; returns their versions, in order.

    Everything runs in one transaction holding an advisory lock: concurrent callers wait for each
    other, and the later ones find nothing left to do; a failing file leaves the database as it
    was. Raises ``store_unavailable`` when the database cannot be reached or a file fails, and
    ``store_unavailable`` too when the database records a migration this farebox does not know
    (it was migrated by a newer farebox).
    """
    known = migrations()
    try:
        async with (
            await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, connect_timeout=_connect_timeout(timeout)
            ) as conn,
            conn.transaction(),
        ):
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute(_CREATE_MIGRATIONS_TABLE)
            done = await _recorded(conn)
            _refuse_newer(done, known)
            applied: list[str] = []
            for version, sql in known:
                if version in done:
                    continue
                # No parameters: sent as a simple query, so a file may hold many statements.
                await conn.execute(sql.encode("utf-8"))
                await conn.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (version) VALUES (%s)",  # noqa: S608
                    (version,),
                )
                applied.append(version)
    except psycopg.Error as exc:
        raise store_unavailable() from exc
    return applied


async def applied_migrations(dsn: str, *, timeout: float = 10.0) -> list[str]:
    """The migrations recorded in the database at ``dsn``, in order (empty if none ever ran)."""
    try:
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=_connect_timeout(timeout)
        ) as conn:
            return sorted(await _recorded(conn))
    except psycopg.Error as exc:
        raise store_unavailable() from exc


async def _recorded(conn: psycopg.AsyncConnection[Any]) -> set[str]:
    # to_regclass is NULL when the table does not exist in the search path: no error to recover
    # from, which inside a transaction would abort it.
    cursor = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATIONS_TABLE,))
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return set()
    cursor = await conn.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")  # noqa: S608
    return {version for (version,) in await cursor.fetchall()}


def _refuse_newer(done: set[str], known: Sequence[tuple[str, str]]) -> None:
    unknown = done - {version for version, _ in known}
    if unknown:
        raise PaymentError("store_unavailable", "the payment store was migrated by a newer farebox")


class PostgresStore:
    """A :class:`~farebox.store.base.Store` in a PostgreSQL database.

    Constructing it does no I/O: a pool of ``min_size`` to ``max_size`` connections is opened on
    first use (or by :meth:`open`), and the schema is checked then (see the module docstring for
    ``migrate``). ``timeout`` bounds, in seconds, opening the pool and waiting for a connection.

    A claim is one ``INSERT ... ON CONFLICT DO NOTHING`` on the primary key, atomic across every
    process and host; a finish or resolve updates the claim and appends its events in one
    transaction. Connections are in autocommit mode, so a single statement costs one round trip.
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        migrate: bool = False,
    ) -> None:
        if min_size < 0 or max_size < max(1, min_size):
            raise ConfigError("the pool needs 0 <= min_size <= max_size and max_size >= 1")
        if timeout <= 0:
            raise ConfigError("timeout must be positive")
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = float(timeout)
        self._migrate = migrate
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        # Created on first use: an asyncio.Lock made outside a running loop is fine since 3.10,
        # but keeping it lazy keeps construction free of any event-loop assumption.
        self._opening: asyncio.Lock | None = None
        self._closed = False

    def __repr__(self) -> str:
        # Never the DSN: it may hold a password.
        return f"PostgresStore(min_size={self._min_size}, max_size={self._max_size})"

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        migrate: bool = False,
    ) -> PostgresStore:
        """A store on ``dsn`` with its pool open and its schema checked now."""
        store = cls(dsn, min_size=min_size, max_size=max_size, timeout=timeout, migrate=migrate)
        await store._get_pool()
        return store

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the Store protocol ----------------------------------------------------------------------

    async def claim(self, key: str, *, owner: str, now: int) -> Claim | None:
        """See :meth:`farebox.store.base.Store.claim`."""
        async with self._connection() as conn:
            cursor = await conn.execute(_CLAIM, (key, owner, now))
            won = cursor.rowcount == 1
        return Claim(key, owner, "held", now) if won else None

    async def release(self, key: str, *, owner: str) -> bool:
        """See :meth:`farebox.store.base.Store.release`."""
        async with self._connection() as conn:
            cursor = await conn.execute(_RELEASE, (key, owner))
            return cursor.rowcount == 1

    async def finish(
        self,
        key: str,
        *,
        owner: str,
        state: Literal["settled", "pending"],
        transaction: str | None,
        events: Sequence[Event] = (),
    ) -> None:
        """See :meth:`farebox.store.base.Store.finish`."""
        check_finish_state(state)
        # Encoded before the transaction: an event that cannot be stored changes nothing.
        rows = _event_rows(events)
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(_FINISH, (state, transaction, key, owner))
            if cursor.rowcount != 1:
                # Raised inside the transaction block: it rolls back (nothing was changed anyway).
                raise claim_not_held()
            await _insert_events(conn, rows)

    async def get_claim(self, key: str) -> Claim | None:
        """See :meth:`farebox.store.base.Store.get_claim`."""
        async with self._connection() as conn:
            cursor = await conn.execute(_GET_CLAIM, (key,))
            row = await cursor.fetchone()
        return None if row is None else _claim(row)

    async def append(self, *events: Event) -> None:
        """See :meth:`farebox.store.base.Store.append`."""
        rows = _event_rows(events)
        if not rows.events:
            return
        async with self._connection() as conn, conn.transaction():
            await _insert_events(conn, rows)

    async def events(
        self,
        *,
        kind: str | None = None,
        payer: str | None = None,
        route: str | None = None,
        since: int | None = None,
        until: int | None = None,
        reference: str | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """See :meth:`farebox.store.base.Store.events`."""
        sql, params = events_query(
            "%s",
            kind=kind,
            payer=payer,
            route=route,
            since=since,
            until=until,
            reference=reference,
            limit=limit,
        )
        async with self._connection() as conn:
            cursor = await conn.execute(sql, params)
            rows = await cursor.fetchall()
        return [
            Event(kind, at, route, payer, reference, decode_event_data(data), event_id)
            for event_id, kind, at, route, payer, reference, data in rows
        ]

    async def prune_traffic(self, *, before: int, keep: int, limit: int = 10_000) -> int:
        """See :meth:`farebox.store.base.Store.prune_traffic`."""
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(_TRAFFIC.cut, (max(0, keep),))
            row = await cursor.fetchone()
            cut = row[0] if row is not None else 0
            cursor = await conn.execute(_TRAFFIC.prune, (int(before), cut, clamp_limit(limit)))
            return max(cursor.rowcount, 0)

    async def traffic_counts(self, *, since: int = 0) -> list[TrafficCount]:
        """See :meth:`farebox.store.base.Store.traffic_counts`."""
        async with self._connection() as conn:
            cursor = await conn.execute(_TRAFFIC.counts, (int(since),))
            rows = await cursor.fetchall()
        return [TrafficCount(int(d), k, r, c, int(n)) for d, k, r, c, n in rows]

    async def prune_traffic_counts(self, *, before: int) -> int:
        """See :meth:`farebox.store.base.Store.prune_traffic_counts`."""
        async with self._connection() as conn:
            cursor = await conn.execute(_TRAFFIC.prune_counts, (int(before),))
            return max(cursor.rowcount, 0)

    async def unfinished(self, *, held_before: int, limit: int = 100) -> list[Claim]:
        """See :meth:`farebox.store.base.Store.unfinished`."""
        async with self._connection() as conn:
            cursor = await conn.execute(_UNFINISHED, (held_before, clamp_limit(limit)))
            rows = await cursor.fetchall()
        return [_claim(row) for row in rows]

    async def resolve(
        self,
        key: str,
        *,
        settled: bool,
        transaction: str | None,
        events: Sequence[Event] = (),
    ) -> bool:
        """See :meth:`farebox.store.base.Store.resolve`."""
        rows = _event_rows(events)
        async with self._connection() as conn, conn.transaction():
            # The state test is in the statement: the row lock makes a concurrent finish or
            # resolve wait, and then this one finds the claim changed and changes nothing.
            if settled:
                cursor = await conn.execute(_RESOLVE_SETTLED, (transaction, key))
            else:
                cursor = await conn.execute(_RESOLVE_FAILED, (key,))
            if cursor.rowcount != 1:
                return False
            await _insert_events(conn, rows)
            return True

    async def begin_idempotent(
        self, key: str, *, fingerprint: str, owner: str, now: int, claim: str | None = None
    ) -> IdempotencyEntry | None:
        """See :meth:`farebox.store.base.Store.begin_idempotent`."""
        async with self._connection() as conn:
            for _ in range(_BEGIN_ATTEMPTS):
                # Two autocommit statements, not one: in one statement the read would use a
                # snapshot taken before a concurrent winner committed, and find nothing.
                cursor = await conn.execute(
                    _BEGIN_IDEMPOTENT, (key, fingerprint, owner, now, claim)
                )
                if cursor.rowcount == 1:
                    return None
                cursor = await conn.execute(_GET_IDEMPOTENT, (key,))
                row = await cursor.fetchone()
                if row is not None:
                    return _entry(row)
        raise PaymentError("store_unavailable", "the idempotency key keeps changing hands")

    async def complete_idempotent(self, key: str, *, owner: str, response: StoredResponse) -> None:
        """See :meth:`farebox.store.base.Store.complete_idempotent`."""
        params = (
            response.status,
            encode_headers(response.headers),
            bytes(response.body),
            key,
            owner,
        )
        async with self._connection() as conn:
            cursor = await conn.execute(_COMPLETE_IDEMPOTENT, params)
            if cursor.rowcount != 1:
                raise claim_not_held()

    async def abandon_idempotent(self, key: str, *, owner: str) -> bool:
        """See :meth:`farebox.store.base.Store.abandon_idempotent`."""
        async with self._connection() as conn:
            cursor = await conn.execute(_ABANDON_IDEMPOTENT, (key, owner))
            return cursor.rowcount == 1

    async def reopen_idempotent(
        self, key: str, *, owner: str, new_owner: str, now: int, claim: str | None
    ) -> bool:
        """See :meth:`farebox.store.base.Store.reopen_idempotent`."""
        params = (new_owner, now, claim, key, owner)
        async with self._connection() as conn:
            cursor = await conn.execute(_REOPEN_IDEMPOTENT, params)
            return cursor.rowcount == 1

    async def get_idempotent(self, key: str) -> IdempotencyEntry | None:
        """See :meth:`farebox.store.base.Store.get_idempotent`."""
        async with self._connection() as conn:
            cursor = await conn.execute(_GET_IDEMPOTENT, (key,))
            row = await cursor.fetchone()
        return None if row is None else _entry(row)

    async def add_invoice(self, invoice: Invoice) -> None:
        """See :meth:`farebox.store.base.Store.add_invoice`."""
        async with self._connection() as conn:
            # ON CONFLICT DO NOTHING covers both unique indexes: a concurrent insert of the same
            # reference or payment intent waits for the first to commit, then inserts nothing.
            cursor = await conn.execute(_ADD_INVOICE, invoice_row(invoice))
            added = cursor.rowcount == 1
        if not added:
            raise invoice_conflict()

    async def get_invoice(self, reference: str) -> Invoice | None:
        """See :meth:`farebox.store.base.Store.get_invoice`."""
        return await self._invoice(_GET_INVOICE, reference)

    async def find_invoice(self, payment_intent: str) -> Invoice | None:
        """See :meth:`farebox.store.base.Store.find_invoice`."""
        return await self._invoice(_FIND_INVOICE, payment_intent)

    async def _invoice(self, sql: str, value: str) -> Invoice | None:
        if not invoice_id_ok(value):
            if self._closed:
                raise PaymentError("store_unavailable", "the payment store is closed")
            return None
        async with self._connection() as conn:
            cursor = await conn.execute(sql, (value,))
            row = await cursor.fetchone()
        return None if row is None else invoice_from_row(row)

    async def prune_invoices(self, *, before: int, limit: int = 1000) -> int:
        """See :meth:`farebox.store.base.Store.prune_invoices`."""
        params = (int(before), INVOICE_CLAIM_PREFIX, clamp_limit(limit))
        async with self._connection() as conn:
            cursor = await conn.execute(_PRUNE_INVOICES, params)
            return max(cursor.rowcount, 0)

    async def aclose(self) -> None:
        """Close the pool; later calls raise ``store_unavailable``."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            # Closing: the connections are gone either way.
            with suppress(psycopg.Error):
                await pool.close(timeout=self._timeout)

    # --- connections -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        pool = await self._get_pool()
        try:
            async with pool.connection(timeout=self._timeout) as conn:
                yield conn
        except psycopg.Error as exc:
            raise store_unavailable() from exc

    async def _get_pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._closed:
            raise PaymentError("store_unavailable", "the payment store is closed")
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is not None:
                return self._pool
            if self._closed:
                raise PaymentError("store_unavailable", "the payment store is closed")
            if self._migrate:
                await migrate(self._dsn, timeout=self._timeout)
            pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._timeout,
                kwargs={
                    "autocommit": True,
                    "connect_timeout": _connect_timeout(self._timeout),
                },
                open=False,
                name="farebox-store",
            )
            try:
                await pool.open(wait=True, timeout=self._timeout)
                async with pool.connection(timeout=self._timeout) as conn:
                    await self._check_schema(conn)
            except psycopg.Error as exc:
                await pool.close()
                raise store_unavailable() from exc
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
            return pool

    async def _check_schema(self, conn: psycopg.AsyncConnection[Any]) -> None:
        done = await _recorded(conn)
        known = migrations()
        _refuse_newer(done, known)
        missing = [version for version, _ in known if version not in done]
        if missing:
            raise ConfigError(
                "the PostgreSQL payment store is not migrated (missing "
                f"{', '.join(missing)}): run `farebox db migrate` with FAREBOX_DATABASE_URL set, "
                "or construct PostgresStore with migrate=True"
            )


class _Rows(NamedTuple):
    """What appending events writes: their rows, and the traffic counts they add to."""

    events: list[tuple[Any, ...]]
    tallies: list[tuple[int, str, str, str]]


def _event_rows(events: Sequence[Event]) -> _Rows:
    rows = [
        (
            event.kind,
            event.at,
            event.route,
            event.payer,
            payer_key(event.payer) if event.payer is not None else None,
            event.reference,
            encode_event_data(event.data),
        )
        for event in events
    ]
    # Sorted: concurrent appends take the count rows' locks in one order (no deadlock).
    return _Rows(rows, sorted(tally for tally in map(traffic_tally, events) if tally is not None))


async def _insert_events(conn: psycopg.AsyncConnection[Any], rows: _Rows) -> None:
    if not rows.events:
        return
    async with conn.cursor() as cursor:
        # executemany pipelines the inserts: one round trip for all of them.
        await cursor.executemany(_INSERT_EVENT, rows.events)
        if rows.tallies:
            await cursor.executemany(_TRAFFIC.add, rows.tallies)


def _claim(row: Sequence[Any]) -> Claim:
    key, owner, state, at, transaction = row
    claim_state: ClaimState = state
    return Claim(key, owner, claim_state, at, transaction)


def _entry(row: Sequence[Any]) -> IdempotencyEntry:
    key, fingerprint, owner, at, status, headers, body, claim = row
    response = (
        None
        if status is None
        else StoredResponse(int(status), decode_headers(headers or "[]"), bytes(body or b""))
    )
    return IdempotencyEntry(key, fingerprint, owner, at, response, claim)
