"""Where a server keeps its payment claims and its log: in memory, SQLite, PostgreSQL or Redis.

A :class:`Store` accepts each payment proof once ever (:meth:`Store.claim`) and keeps an
append-only log of :class:`Event` lines and the :class:`Invoice` records of X-Receipt card
payments. :class:`SqliteStore` is the default and is shared safely by every process of a server;
:class:`MemoryStore` is for tests and single-process demos;
:class:`~farebox.store.postgres.PostgresStore` (extra ``postgres``) and
:class:`~farebox.store.redis.RedisStore` (extra ``redis``) are shared across hosts. Those two are
imported on first access, so that their drivers are needed only by those who use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from farebox.store.base import (
    INVOICE_CLAIM_PREFIX,
    Claim,
    ClaimState,
    Event,
    IdempotencyEntry,
    Invoice,
    Store,
    StoredResponse,
    invoice_claim_key,
)
from farebox.store.memory import MemoryStore
from farebox.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from farebox.store.postgres import PostgresStore
    from farebox.store.redis import RedisStore

__all__ = [
    "INVOICE_CLAIM_PREFIX",
    "Claim",
    "ClaimState",
    "Event",
    "IdempotencyEntry",
    "Invoice",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "SqliteStore",
    "Store",
    "StoredResponse",
    "invoice_claim_key",
]


def __getattr__(name: str) -> Any:
    # Lazy: psycopg and redis are optional dependencies.
    if name == "PostgresStore":
        from farebox.store.postgres import PostgresStore

        return PostgresStore
    if name == "RedisStore":
        from farebox.store.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
