"""Where a server keeps its payment claims and its log: in memory, or in a SQLite file.

A :class:`Store` accepts each payment proof once ever (:meth:`Store.claim`) and keeps an
append-only log of :class:`Event` lines. :class:`SqliteStore` is the default and is shared safely
by every process of a server; :class:`MemoryStore` is for tests and single-process demos.
"""

from farebox.store.base import Claim, ClaimState, Event, Store
from farebox.store.memory import MemoryStore
from farebox.store.sqlite import SqliteStore

__all__ = ["Claim", "ClaimState", "Event", "MemoryStore", "SqliteStore", "Store"]
