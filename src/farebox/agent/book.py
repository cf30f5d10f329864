"""The agent's receipt book: every payment it made, with the server's signed receipt, in SQLite.

Append-only (the file refuses updates and deletes) and private (mode 0600). Amounts are kept as
decimal text because a uint256 does not fit SQLite's 64-bit integers.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from farebox.errors import ConfigError, PaymentError
from farebox.store.sqlite import open_database

__all__ = ["MAX_ENTRIES", "BookEntry", "ReceiptBook"]

T = TypeVar("T")

#: The most entries one query returns.
MAX_ENTRIES = 10_000

_SCHEMA_VERSION = 1
_SCHEMA = (
    # The triggers below forbid deletes, so rowids are never reused: no need for AUTOINCREMENT.
    """
    CREATE TABLE IF NOT EXISTS receipts (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        url TEXT NOT NULL,
        host TEXT NOT NULL,
        method TEXT NOT NULL,
        status INTEGER NOT NULL,
        network TEXT NOT NULL,
        asset TEXT NOT NULL,
        amount TEXT NOT NULL,
        pay_to TEXT NOT NULL,
        payer TEXT NOT NULL,
        txn TEXT,
        receipt_jws TEXT,
        receipt_ref TEXT UNIQUE,
        issuer TEXT,
        verified INTEGER NOT NULL CHECK (verified IN (0, 1))
    )
    """,
    "CREATE INDEX IF NOT EXISTS receipts_host_at ON receipts (host, at)",
    "CREATE INDEX IF NOT EXISTS receipts_at ON receipts (at)",
    """
    CREATE TRIGGER IF NOT EXISTS receipts_no_update BEFORE UPDATE ON receipts
    BEGIN SELECT RAISE(ABORT, 'the receipt book is append-only'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS receipts_no_delete BEFORE DELETE ON receipts
    BEGIN SELECT RAISE(ABORT, 'the receipt book is append-only'); END
    """,
)

_COLUMNS = (
    "at, url, method, status, network, asset, amount, pay_to, payer, txn, receipt_jws, "
    "receipt_ref, issuer, verified"
)
_INSERT = f"INSERT INTO receipts (host, {_COLUMNS}) VALUES ({', '.join('?' * 15)})"  # noqa: S608
_SELECT = f"SELECT {_COLUMNS} FROM receipts"  # noqa: S608


@dataclass(frozen=True, slots=True)
class BookEntry:
    """One payment: the request, what was paid to whom, the settlement and the receipt.

    ``amount`` is in the asset's atomic units; ``receipt_ref`` (unique in a book) and ``issuer``
    come from the PEAC record when there was one; ``verified`` says whether it verified.
    """

    at: int
    url: str
    method: str
    status: int
    network: str
    asset: str
    amount: int
    pay_to: str
    payer: str
    transaction: str | None
    receipt_jws: str | None
    receipt_ref: str | None
    issuer: str | None
    verified: bool

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int) or self.amount < 0:
            raise ConfigError("a book entry's amount is a non-negative int of atomic units")
        if not isinstance(self.verified, bool):
            raise ConfigError("a book entry's verified is a bool")


def _host(url_or_host: str, *, is_url: bool) -> str:
    # The host name alone, lowercased: "API.example.com:8443" and "api.example.com" are one host.
    try:
        host = urlsplit(url_or_host if is_url else f"//{url_or_host}").hostname
    except ValueError:
        host = None
    return host if host is not None else url_or_host.lower()


class ReceiptBook:
    """Receipts in a SQLite file (mode 0600, WAL); ``path`` ``None`` keeps them in memory.

    Safe to share between threads; the methods are synchronous, each one short transaction.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = open_database(
            path, schema=_SCHEMA, version=_SCHEMA_VERSION
        )

    def __enter__(self) -> ReceiptBook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(self, entry: BookEntry) -> None:
        """Append ``entry``. A ``receipt_ref`` already in the book is refused with
        :class:`~farebox.errors.PaymentError` ``receipt_invalid`` (a server replaying a receipt)."""
        row = (
            _host(entry.url, is_url=True),
            entry.at,
            entry.url,
            entry.method,
            entry.status,
            entry.network,
            entry.asset,
            str(entry.amount),
            entry.pay_to,
            entry.payer,
            entry.transaction,
            entry.receipt_jws,
            entry.receipt_ref,
            entry.issuer,
            int(entry.verified),
        )
        try:
            self._run(lambda conn: conn.execute(_INSERT, row))
        except PaymentError as exc:
            cause = exc.__cause__
            if isinstance(cause, sqlite3.IntegrityError) and "receipt_ref" in str(cause):
                raise PaymentError(
                    "receipt_invalid",
                    f"receipt {entry.receipt_ref} is already in the receipt book: "
                    "a receipt is never valid for two payments",
                ) from None
            raise

    def entries(
        self,
        *,
        host: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 100,
    ) -> list[BookEntry]:
        """Entries newest first. ``host`` is a host name (case-insensitive, any port);
        ``since`` is inclusive, ``until`` exclusive; ``limit`` is capped at :data:`MAX_ENTRIES`."""
        clauses: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("host = ?", _host(host, is_url=False) if host is not None else None),
            ("at >= ?", since),
            ("at < ?", until),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        # Only the constant clauses above are formatted in; values are bound parameters.
        sql = f"{_SELECT}{where} ORDER BY at DESC, id DESC LIMIT ?"
        params.append(max(0, min(int(limit), MAX_ENTRIES)))
        return self._run(lambda conn: [_entry(row) for row in conn.execute(sql, params)])

    def get(self, receipt_ref: str) -> BookEntry | None:
        """The entry with ``receipt_ref``, if any."""
        row = self._run(
            lambda conn: conn.execute(f"{_SELECT} WHERE receipt_ref = ?", (receipt_ref,)).fetchone()
        )
        return None if row is None else _entry(row)

    def close(self) -> None:
        """Close the file; later calls raise ``store_unavailable``."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _run(self, run: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                raise PaymentError("store_unavailable", "the receipt book is closed")
            try:
                return run(self._conn)
            except sqlite3.Error as exc:
                raise PaymentError(
                    "store_unavailable", "the agent's receipt book is unavailable"
                ) from exc


def _entry(row: tuple[Any, ...]) -> BookEntry:
    (
        at,
        url,
        method,
        status,
        network,
        asset,
        amount,
        pay_to,
        payer,
        transaction,
        receipt_jws,
        receipt_ref,
        issuer,
        verified,
    ) = row
    return BookEntry(
        at=at,
        url=url,
        method=method,
        status=status,
        network=network,
        asset=asset,
        amount=int(amount),
        pay_to=pay_to,
        payer=payer,
        transaction=transaction,
        receipt_jws=receipt_jws,
        receipt_ref=receipt_ref,
        issuer=issuer,
        verified=bool(verified),
    )
