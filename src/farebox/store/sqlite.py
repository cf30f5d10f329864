"""The default store: one SQLite file, shared safely by every process of a server.

A claim is one ``INSERT ... ON CONFLICT DO NOTHING`` on a primary key, which SQLite makes atomic
across processes, so a proof is accepted once ever however many workers share the file. The file
is in WAL mode with ``synchronous=NORMAL``: a commit appends to the WAL without an fsync, which is
what makes a store operation cost tens of microseconds (a power loss may forget the last commits,
never corrupt the file).

:func:`open_database` is shared with the agent's budget and receipt book: a private (0600) file,
WAL, and a schema created on open and versioned with ``PRAGMA user_version``.

Schema versions of the store: 1 had claims and events; 2 adds the ``idempotency`` table and the
``claims_unfinished`` index that reconciliation reads; 3 adds ``idempotency.claim``; 4 adds the
``invoices`` table (X-Receipt card payments); 5 adds ``traffic_counts`` and lets traffic events
(:data:`~farebox.store.base.TRAFFIC_KINDS`), and only those, be deleted. Every
statement of :data:`_SCHEMA` is idempotent (``IF NOT EXISTS``), so an older file is migrated by
running the whole list again, then the steps of :data:`_MIGRATIONS` newer than the file (changes
such as ``ADD COLUMN`` that cannot be written idempotently), all in the same ``BEGIN IMMEDIATE``
transaction that bumps ``user_version``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio.to_thread
import orjson

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
    TRAFFIC_KINDS_SQL,
    events_query,
    invoice_from_row,
    invoice_row,
    invoice_statements,
    traffic_statements,
)

__all__ = [
    "SqliteStore",
    "decode_headers",
    "encode_headers",
    "open_database",
    "store_unavailable",
]

T = TypeVar("T")

SCHEMA_VERSION = 5

# The payment log is never deleted from; traffic events (challenges, refusals, replays: what any
# client can make more of) are pruned.
_NO_DELETE = f"""
    CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    WHEN OLD.kind NOT IN ({TRAFFIC_KINDS_SQL})
    BEGIN SELECT RAISE(ABORT, 'the payment log is append-only'); END
    """

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS claims (
        key TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('held', 'settled', 'pending')),
        at INTEGER NOT NULL,
        txn TEXT
    ) WITHOUT ROWID
    """,
    # AUTOINCREMENT would cost an extra sqlite_sequence write (25-40 µs per transaction) to keep
    # ids from being reused after deletes; only traffic events are ever deleted, and a pruned id
    # would be reused only if it were the newest row, which pruning never takes.
    """
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        at INTEGER NOT NULL,
        route TEXT NOT NULL DEFAULT '',
        payer TEXT,
        payer_key TEXT,
        reference TEXT,
        data TEXT NOT NULL DEFAULT '{}'
    )
    """,
    # Each index costs about 10 µs per inserted event here; the partial ones skip the events
    # without a payer or a reference (challenges, the most frequent, have no payer). A query with
    # `payer_key = ?` implies `payer_key IS NOT NULL`, so SQLite still uses them.
    "CREATE INDEX IF NOT EXISTS events_payer_at ON events (payer_key, at) "
    "WHERE payer_key IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS events_route_at ON events (route, at)",
    "CREATE INDEX IF NOT EXISTS events_at ON events (at)",
    "CREATE INDEX IF NOT EXISTS events_reference ON events (reference) WHERE reference IS NOT NULL",
    """
    CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the payment log is append-only'); END
    """,
    _NO_DELETE,
    # Version 2. Partial: settled claims, nearly all of them, are never looked at again by
    # reconciliation, and an index of only the few unfinished ones costs nothing to keep.
    "CREATE INDEX IF NOT EXISTS claims_unfinished ON claims (at) WHERE state <> 'settled'",
    # `status` is NULL while the first request runs; `headers` is a JSON list of [name, value].
    """
    CREATE TABLE IF NOT EXISTS idempotency (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        owner TEXT NOT NULL,
        at INTEGER NOT NULL,
        status INTEGER,
        headers TEXT,
        body BLOB
    ) WITHOUT ROWID
    """,
    # Version 4. Both the reference and the PaymentIntent are unique: one PaymentIntent pays for
    # one invoice. `amount` is INTEGER: an Invoice holds at most a signed 64-bit amount, which
    # SQLite keeps exactly.
    """
    CREATE TABLE IF NOT EXISTS invoices (
        reference TEXT PRIMARY KEY,
        payment_intent TEXT NOT NULL UNIQUE,
        route TEXT NOT NULL,
        resource TEXT NOT NULL,
        amount INTEGER NOT NULL,
        currency TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS invoices_expires_at ON invoices (expires_at)",
    # Version 5. Pruning walks traffic events only: without this index it would read the whole
    # payment log, under the write lock, on every pass. It costs an insert only for traffic.
    f"CREATE INDEX IF NOT EXISTS events_traffic ON events (id) WHERE kind IN ({TRAFFIC_KINDS_SQL})",
    # A few rows a day per route and code, whatever the traffic.
    """
    CREATE TABLE IF NOT EXISTS traffic_counts (
        day INTEGER NOT NULL,
        kind TEXT NOT NULL,
        route TEXT NOT NULL,
        code TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (day, kind, route, code)
    ) WITHOUT ROWID
    """,
)

# Steps by the version that introduced them, run (in order) on a file older than that version,
# after :data:`_SCHEMA`. A new file runs them all too: its tables are created as version 2
# described them, so the column is added the one way every file gets it.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # The claim key of the proof a running request spent (NULL for entries from before).
    3: ("ALTER TABLE idempotency ADD COLUMN claim TEXT",),
    # The trigger of versions 1 to 4 forbade every delete.
    5: ("DROP TRIGGER IF EXISTS events_no_delete", _NO_DELETE),
}

_CLAIM = (
    "INSERT INTO claims (key, owner, state, at) VALUES (?, ?, 'held', ?) "
    "ON CONFLICT (key) DO NOTHING"
)
_RELEASE = "DELETE FROM claims WHERE key = ? AND owner = ? AND state = 'held'"
_FINISH = "UPDATE claims SET state = ?, txn = ? WHERE key = ? AND owner = ? AND state = 'held'"
_GET_CLAIM = "SELECT key, owner, state, at, txn FROM claims WHERE key = ?"
# `state <> 'settled'` is the partial index's own clause, spelled alike so that SQLite uses it.
_UNFINISHED = (
    "SELECT key, owner, state, at, txn FROM claims "
    "WHERE state <> 'settled' AND (state = 'pending' OR at < ?) ORDER BY at, key LIMIT ?"
)
_RESOLVE_SETTLED = (
    "UPDATE claims SET state = 'settled', txn = ? WHERE key = ? AND state IN ('held', 'pending')"
)
_RESOLVE_FAILED = "DELETE FROM claims WHERE key = ? AND state IN ('held', 'pending')"
_BEGIN_IDEMPOTENT = (
    "INSERT INTO idempotency (key, fingerprint, owner, at, claim) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO NOTHING"
)
_GET_IDEMPOTENT = (
    "SELECT key, fingerprint, owner, at, status, headers, body, claim FROM idempotency "
    "WHERE key = ?"
)
_COMPLETE_IDEMPOTENT = (
    "UPDATE idempotency SET status = ?, headers = ?, body = ? "
    "WHERE key = ? AND owner = ? AND status IS NULL"
)
_ABANDON_IDEMPOTENT = "DELETE FROM idempotency WHERE key = ? AND owner = ? AND status IS NULL"
_REOPEN_IDEMPOTENT = (
    "UPDATE idempotency SET owner = ?, at = ?, claim = ?, status = NULL, headers = NULL, "
    "body = NULL WHERE key = ? AND owner = ? AND status IS NOT NULL"
)
_INSERT_EVENT = (
    "INSERT INTO events (kind, at, route, payer, payer_key, reference, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_ADD_INVOICE, _GET_INVOICE, _FIND_INVOICE, _PRUNE_INVOICES = invoice_statements("?")
_TRAFFIC = traffic_statements("?")

# Write transactions between two checkpoints: a paid request (claim, then finish with three
# events) writes about 8 pages in 2 transactions, so about 500 pages, half SQLite's default.
_CHECKPOINT_EVERY = 128

_MEMORY = ":memory:"

# SQLite's primary result codes for "another connection holds the lock".
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6


def store_unavailable() -> PaymentError:
    """The error every storage failure becomes (raise it ``from exc``).

    The message is generic on purpose: it may reach an HTTP client, and the underlying error (kept
    as ``__cause__`` for logs) can name files.
    """
    return PaymentError("store_unavailable", "the payment store is unavailable")


def open_database(
    path: str | os.PathLike[str] | None,
    *,
    schema: Sequence[str],
    version: int,
    busy_timeout: float = 5.0,
    migrations: Mapping[int, Sequence[str]] | None = None,
) -> sqlite3.Connection:
    """Open (creating if needed) the SQLite database at ``path`` with ``schema`` at ``version``.

    ``None`` or ``":memory:"`` is a private in-memory database. A new file is created with mode
    0600 (payment records are private) in a directory created if missing; SQLite gives its WAL
    and shared-memory files the same mode. The connection is in autocommit mode (callers write
    ``BEGIN IMMEDIATE`` themselves), usable from any thread (one at a time), in WAL mode with
    ``synchronous=NORMAL`` and a busy timeout of ``busy_timeout`` seconds. ``schema`` statements
    must be idempotent (``IF NOT EXISTS``); ``migrations`` maps a version to statements run
    after ``schema`` on a file older than that version (new files included), in version order.
    A file whose ``user_version`` is newer than ``version`` is refused. Every failure is
    :func:`store_unavailable`.
    """
    target = _MEMORY if path is None else os.fspath(path)
    try:
        if target != _MEMORY:
            _create_private(Path(target))
        conn = sqlite3.connect(
            target, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except (OSError, sqlite3.Error) as exc:
        raise store_unavailable() from exc
    try:
        if target != _MEMORY:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            (found,) = conn.execute("PRAGMA user_version").fetchone()
            if found > version:
                raise PaymentError(
                    "store_unavailable", "the payment store was written by a newer farebox"
                )
            if found < version:
                for statement in schema:
                    conn.execute(statement)
                for step in sorted((migrations or {}).items()):
                    if found < step[0] <= version:
                        for statement in step[1]:
                            conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        conn.close()
        raise store_unavailable() from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _create_private(path: Path) -> None:
    # Creating the file before SQLite does is the only way to choose its mode; an existing file
    # keeps the mode its owner gave it.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.close(fd)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "locked" in str(exc) or "busy" in str(exc)
    return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


class SqliteStore:
    """A :class:`~farebox.store.base.Store` in one SQLite file, shared by any number of processes.

    Constructing it does no I/O: the file is opened (and created, mode 0600, with its directory)
    on first use, from the event loop. :meth:`open` opens it at once, to fail at startup rather
    than on the first paid request.

    Each operation runs one short SQLite transaction. Measured on a 2-vCPU VM, handing a call to a
    worker thread (``anyio.to_thread.run_sync``) adds 200-300 µs, while run directly a claim costs
    about 40 µs and a settlement with three log lines about 160 µs (WAL commits do not fsync).
    So operations run in the event loop's thread, with SQLite's busy timeout at zero so that they
    never wait: when another process holds the write lock (or another thread this connection),
    the operation is retried in a worker thread that waits up to ``busy_timeout`` seconds. Slow
    work never runs in the loop: opening the file, event queries, and WAL checkpoints, which
    SQLite would otherwise run inside a commit every 1000 pages (stalls of 6-14 ms were measured)
    and which a background thread runs instead. Operations that run inline do not yield to the
    event loop, like any short synchronous call.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        if busy_timeout < 0:
            raise ConfigError("busy_timeout must not be negative")
        self._path = os.fspath(path)
        self._busy_ms = int(busy_timeout * 1000)
        # Guards self._conn: one thread uses the connection at a time.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._inline = False
        self._closed = False
        self._writes = 0
        # Guards the start of the checkpoint thread (one at a time).
        self._checkpoint_lock = threading.Lock()
        self._checkpoint_thread: threading.Thread | None = None
        # Connections inherited through fork(): never used, and never closed, because closing
        # SQLite files in a child can drop locks the child's own connection relies on.
        self._inherited: list[sqlite3.Connection] = []

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> SqliteStore:
        """A store on ``path``, opened now (raises ``store_unavailable`` if it cannot be)."""
        store = cls(path, busy_timeout=busy_timeout)
        await store._call(lambda conn: None, inline=False)
        return store

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the Store protocol ----------------------------------------------------------------------

    async def claim(self, key: str, *, owner: str, now: int) -> Claim | None:
        """See :meth:`farebox.store.base.Store.claim`."""

        def run(conn: sqlite3.Connection) -> bool:
            # One statement is its own transaction, and it takes the write lock before reading,
            # so two processes racing on a key cannot both insert it.
            return conn.execute(_CLAIM, (key, owner, now)).rowcount == 1

        won = await self._call(run, write=True)
        return Claim(key, owner, "held", now) if won else None

    async def release(self, key: str, *, owner: str) -> bool:
        """See :meth:`farebox.store.base.Store.release`."""

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(_RELEASE, (key, owner)).rowcount == 1

        return await self._call(run, write=True)

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

        def run(conn: sqlite3.Connection) -> None:
            with _WriteTransaction(conn):
                if conn.execute(_FINISH, (state, transaction, key, owner)).rowcount != 1:
                    raise claim_not_held()
                _insert_events(conn, events)

        await self._call(run, write=True)

    async def get_claim(self, key: str) -> Claim | None:
        """See :meth:`farebox.store.base.Store.get_claim`."""

        def run(conn: sqlite3.Connection) -> Claim | None:
            row = conn.execute(_GET_CLAIM, (key,)).fetchone()
            return None if row is None else _claim(row)

        return await self._call(run)

    async def append(self, *events: Event) -> None:
        """See :meth:`farebox.store.base.Store.append`."""
        if not events:
            return

        def run(conn: sqlite3.Connection) -> None:
            with _WriteTransaction(conn):
                _insert_events(conn, events)

        await self._call(run, write=True)

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
            "?",
            kind=kind,
            payer=payer,
            route=route,
            since=since,
            until=until,
            reference=reference,
            limit=limit,
        )

        def run(conn: sqlite3.Connection) -> list[Event]:
            return [
                Event(kind, at, route, payer, reference, decode_event_data(data), event_id)
                for event_id, kind, at, route, payer, reference, data in conn.execute(sql, params)
            ]

        # A query may read thousands of rows: never in the event loop.
        return await self._call(run, inline=False)

    async def prune_traffic(self, *, before: int, keep: int, limit: int = 10_000) -> int:
        """See :meth:`farebox.store.base.Store.prune_traffic`."""

        def run(conn: sqlite3.Connection) -> int:
            with _WriteTransaction(conn):
                row = conn.execute(_TRAFFIC.cut, (max(0, keep),)).fetchone()
                cut = row[0] if row is not None else 0
                params = (before, cut, clamp_limit(limit))
                return max(conn.execute(_TRAFFIC.prune, params).rowcount, 0)

        return await self._call(run, write=True)

    async def traffic_counts(self, *, since: int = 0) -> list[TrafficCount]:
        """See :meth:`farebox.store.base.Store.traffic_counts`."""

        def run(conn: sqlite3.Connection) -> list[TrafficCount]:
            rows = conn.execute(_TRAFFIC.counts, (since,)).fetchall()
            return [TrafficCount(*row) for row in rows]

        return await self._call(run)

    async def prune_traffic_counts(self, *, before: int) -> int:
        """See :meth:`farebox.store.base.Store.prune_traffic_counts`."""

        def run(conn: sqlite3.Connection) -> int:
            return max(conn.execute(_TRAFFIC.prune_counts, (before,)).rowcount, 0)

        return await self._call(run, write=True)

    async def unfinished(self, *, held_before: int, limit: int = 100) -> list[Claim]:
        """See :meth:`farebox.store.base.Store.unfinished`."""
        params = (held_before, clamp_limit(limit))

        def run(conn: sqlite3.Connection) -> list[Claim]:
            return [_claim(row) for row in conn.execute(_UNFINISHED, params)]

        # Reconciliation runs in the background and may read many rows: never in the loop.
        return await self._call(run, inline=False)

    async def resolve(
        self,
        key: str,
        *,
        settled: bool,
        transaction: str | None,
        events: Sequence[Event] = (),
    ) -> bool:
        """See :meth:`farebox.store.base.Store.resolve`."""

        def run(conn: sqlite3.Connection) -> bool:
            with _WriteTransaction(conn):
                # The state test is in the statement itself: whoever changed the claim first
                # (finish, another reconciler) wins, and this one changes nothing.
                if settled:
                    changed = conn.execute(_RESOLVE_SETTLED, (transaction, key)).rowcount
                else:
                    changed = conn.execute(_RESOLVE_FAILED, (key,)).rowcount
                if changed != 1:
                    return False
                _insert_events(conn, events)
                return True

        return await self._call(run, write=True)

    async def begin_idempotent(
        self, key: str, *, fingerprint: str, owner: str, now: int, claim: str | None = None
    ) -> IdempotencyEntry | None:
        """See :meth:`farebox.store.base.Store.begin_idempotent`."""

        def run(conn: sqlite3.Connection) -> IdempotencyEntry | None:
            # One write transaction: the entry read after a lost insert is the one that won it
            # (it cannot be abandoned in between by another process).
            with _WriteTransaction(conn):
                if (
                    conn.execute(_BEGIN_IDEMPOTENT, (key, fingerprint, owner, now, claim)).rowcount
                    == 1
                ):
                    return None
                row = conn.execute(_GET_IDEMPOTENT, (key,)).fetchone()
                return None if row is None else _entry(row)

        return await self._call(run, write=True)

    async def complete_idempotent(self, key: str, *, owner: str, response: StoredResponse) -> None:
        """See :meth:`farebox.store.base.Store.complete_idempotent`."""
        params = (
            response.status,
            encode_headers(response.headers),
            bytes(response.body),
            key,
            owner,
        )

        def run(conn: sqlite3.Connection) -> None:
            if conn.execute(_COMPLETE_IDEMPOTENT, params).rowcount != 1:
                raise claim_not_held()

        await self._call(run, write=True)

    async def abandon_idempotent(self, key: str, *, owner: str) -> bool:
        """See :meth:`farebox.store.base.Store.abandon_idempotent`."""

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(_ABANDON_IDEMPOTENT, (key, owner)).rowcount == 1

        return await self._call(run, write=True)

    async def reopen_idempotent(
        self, key: str, *, owner: str, new_owner: str, now: int, claim: str | None
    ) -> bool:
        """See :meth:`farebox.store.base.Store.reopen_idempotent`."""
        params = (new_owner, now, claim, key, owner)

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(_REOPEN_IDEMPOTENT, params).rowcount == 1

        return await self._call(run, write=True)

    async def get_idempotent(self, key: str) -> IdempotencyEntry | None:
        """See :meth:`farebox.store.base.Store.get_idempotent`."""

        def run(conn: sqlite3.Connection) -> IdempotencyEntry | None:
            row = conn.execute(_GET_IDEMPOTENT, (key,)).fetchone()
            return None if row is None else _entry(row)

        return await self._call(run)

    async def add_invoice(self, invoice: Invoice) -> None:
        """See :meth:`farebox.store.base.Store.add_invoice`."""
        params = invoice_row(invoice)

        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(_ADD_INVOICE, params).rowcount == 1

        if not await self._call(run, write=True):
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

        def run(conn: sqlite3.Connection) -> Invoice | None:
            row = conn.execute(sql, (value,)).fetchone()
            return None if row is None else invoice_from_row(row)

        return await self._call(run)

    async def prune_invoices(self, *, before: int, limit: int = 1000) -> int:
        """See :meth:`farebox.store.base.Store.prune_invoices`."""
        params = (int(before), INVOICE_CLAIM_PREFIX, clamp_limit(limit))

        def run(conn: sqlite3.Connection) -> int:
            # One statement: a claim taken meanwhile either is seen (the invoice stays) or comes
            # after the delete; the write lock is taken before the read.
            return conn.execute(_PRUNE_INVOICES, params).rowcount

        # May delete thousands of rows: never in the event loop.
        return await self._call(run, write=True, inline=False)

    async def aclose(self) -> None:
        """Close the file; later calls raise ``store_unavailable``."""
        if not self._closed:
            await anyio.to_thread.run_sync(self._close)

    # --- running operations ----------------------------------------------------------------------

    async def _call(
        self, run: Callable[[sqlite3.Connection], T], *, write: bool = False, inline: bool = True
    ) -> T:
        if self._closed:
            raise PaymentError("store_unavailable", "the payment store is closed")
        result: T
        if (
            inline
            and self._inline
            and self._pid == os.getpid()
            and self._lock.acquire(blocking=False)
        ):
            try:
                conn = self._conn
                if conn is not None:
                    try:
                        result = run(conn)
                    except sqlite3.Error as exc:
                        if not _is_busy(exc):
                            raise store_unavailable() from exc
                    else:
                        if write:
                            self._wrote()
                        return result
            finally:
                self._lock.release()
        result = await anyio.to_thread.run_sync(self._blocking, run)
        if write:
            self._wrote()
        return result

    def _blocking(self, run: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                try:
                    return run(conn)
                finally:
                    conn.execute("PRAGMA busy_timeout = 0")
            except sqlite3.Error as exc:
                raise store_unavailable() from exc

    def _connection(self) -> sqlite3.Connection:
        # Called with self._lock held.
        if self._closed:
            raise PaymentError("store_unavailable", "the payment store is closed")
        if self._conn is not None:
            if self._pid == os.getpid():
                return self._conn
            self._inherited.append(self._conn)
            self._conn = None
            self._checkpoint_thread = None
        conn = open_database(
            self._path,
            schema=_SCHEMA,
            version=SCHEMA_VERSION,
            migrations=_MIGRATIONS,
            busy_timeout=self._busy_ms / 1000,
        )
        try:
            # The store runs checkpoints itself (see the class docstring); a WAL grown by a burst
            # is cut back to 16 MiB when it starts over.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA journal_size_limit = 16777216")
            conn.execute("PRAGMA busy_timeout = 0")
            (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        except sqlite3.Error as exc:
            conn.close()
            raise store_unavailable() from exc
        # Without WAL (a file system without shared memory) a commit fsyncs: too slow for the loop.
        self._inline = mode in ("wal", "memory")
        self._conn = conn
        self._pid = os.getpid()
        return conn

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes >= _CHECKPOINT_EVERY and self._path != _MEMORY:
            self._writes = 0
            with self._checkpoint_lock:
                running = self._checkpoint_thread
                if self._closed or (running is not None and running.is_alive()):
                    return
                thread = threading.Thread(
                    target=self._checkpoint, name="farebox-store-checkpoint", daemon=True
                )
                self._checkpoint_thread = thread
                thread.start()

    def _checkpoint(self) -> None:
        # On the store's own connection, holding its lock: operations that arrive meanwhile wait
        # for the few milliseconds it takes in a worker thread, never in the loop. Measured over
        # 10,000 settlements, against the alternatives:
        # - SQLite's own autocheckpoint runs inside a commit, in the loop: stalls of 6-14 ms.
        # - A checkpoint on a second connection, concurrent with this process's writes: its
        #   fsyncs slowed the writes in the loop (p99.9 2-4 ms instead of 0.6 ms), and the WAL
        #   was rarely fully copied at the moment of a write, so it could not start over.
        # PASSIVE never waits for other processes; what it cannot copy now, the next one will.
        with self._lock:
            conn = self._conn
            if conn is not None and self._pid == os.getpid():
                with suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _close(self) -> None:
        with self._checkpoint_lock:
            thread = self._checkpoint_thread
        if thread is not None:
            thread.join()
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                with suppress(sqlite3.Error):
                    conn.close()


class _WriteTransaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that reads first can
        # fail to upgrade (SQLITE_BUSY_SNAPSHOT) without the busy handler ever running.
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def _insert_events(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
    # Each event's data is encoded here, inside the transaction, so that an event that cannot be
    # stored undoes everything before it.
    conn.executemany(
        _INSERT_EVENT,
        (
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
        ),
    )
    # Sorted: concurrent appends take the count rows' locks in one order.
    tallies = sorted(tally for tally in map(traffic_tally, events) if tally is not None)
    if tallies:
        conn.executemany(_TRAFFIC.add, tallies)


def encode_headers(headers: Sequence[tuple[str, str]]) -> str:
    """Response headers as a JSON list of ``[name, value]`` pairs (order and repeats kept)."""
    return orjson.dumps([[str(name), str(value)] for name, value in headers]).decode()


def decode_headers(text: str | bytes) -> tuple[tuple[str, str], ...]:
    """The inverse of :func:`encode_headers`."""
    return tuple((str(name), str(value)) for name, value in orjson.loads(text))


def _entry(row: tuple[Any, ...]) -> IdempotencyEntry:
    key, fingerprint, owner, at, status, headers, body, claim = row
    response = (
        None
        if status is None
        else StoredResponse(int(status), decode_headers(headers or "[]"), bytes(body or b""))
    )
    return IdempotencyEntry(key, fingerprint, owner, at, response, claim)


def _claim(row: tuple[Any, ...]) -> Claim:
    key, owner, state, at, transaction = row
    claim_state: ClaimState = state
    return Claim(key, owner, claim_state, at, transaction)
