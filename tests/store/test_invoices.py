"""Invoice records (X-Receipt card payments): the same promises from every store.

The ``store`` fixture (conftest.py) runs each test over memory, SQLite, PostgreSQL and Redis; the
two-instance races use :func:`~tests.store.conftest.store_factory` for the stores that are shared.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from farebox.errors import ConfigError, PaymentError
from farebox.store import (
    INVOICE_CLAIM_PREFIX,
    Claim,
    Event,
    Invoice,
    SqliteStore,
    Store,
    invoice_claim_key,
)
from farebox.store.base import MAX_INVOICE_ID, MAX_INVOICE_REFERENCE, invoice_id_ok
from farebox.store.postgres import PostgresStore, migrate, migrations
from farebox.store.sqlite import _MIGRATIONS, _SCHEMA, SCHEMA_VERSION, open_database
from tests.support.stores import drop_schema, recreate_schema, schema_dsn, store_factory, worker_id

pytestmark = pytest.mark.anyio

SHARED = ("sqlite", "postgres", "redis")


def invoice(n: int = 1, **changes: Any) -> Invoice:
    made = Invoice(
        reference=f"inv_{n:032x}",
        route="GET /report",
        resource=f"https://api.example/report?n={n}&q=café",
        amount=500 + n,
        currency="usd",
        payment_intent=f"pi_{n:024d}",
        created_at=1,
        expires_at=1_900,
    )
    return replace(made, **changes) if changes else made


async def added(store: Store, new: Invoice) -> bool:
    """Whether ``new`` was recorded (False: refused as a conflict; other errors propagate)."""
    try:
        await store.add_invoice(new)
    except PaymentError as exc:
        if exc.code != "invoice_conflict":
            raise
        return False
    return True


async def conflict(store: Store, new: Invoice) -> None:
    with pytest.raises(PaymentError) as refused:
        await store.add_invoice(new)
    assert refused.value.code == "invoice_conflict"
    assert refused.value.status == 500


# --- records -------------------------------------------------------------------------------------


async def test_an_invoice_round_trips_by_reference_and_by_payment_intent(store: Store) -> None:
    first, second = invoice(1), invoice(2, amount=2**63 - 1, currency="eur", route="POST /x")
    assert await store.get_invoice(first.reference) is None
    assert await store.find_invoice(first.payment_intent) is None
    await store.add_invoice(first)
    await store.add_invoice(second)
    assert await store.get_invoice(first.reference) == first
    assert await store.find_invoice(first.payment_intent) == first
    # Exact at the widest amount, and unicode in the resource kept as written.
    assert await store.get_invoice(second.reference) == second
    assert await store.find_invoice(second.payment_intent) == second
    # A reference is not a payment intent, nor the other way round.
    assert await store.find_invoice(first.reference) is None
    assert await store.get_invoice(first.payment_intent) is None
    # Recording an invoice neither claims it nor logs anything.
    assert await store.get_claim(invoice_claim_key(first.reference)) is None
    assert await store.events() == []


async def test_a_duplicate_reference_is_refused_and_changes_nothing(store: Store) -> None:
    first = invoice(1)
    await store.add_invoice(first)
    await conflict(store, first)
    clash = invoice(2, reference=first.reference, amount=1)
    await conflict(store, clash)
    assert await store.get_invoice(first.reference) == first
    assert await store.find_invoice(first.payment_intent) == first
    # The refused invoice's payment intent was not recorded either.
    assert await store.find_invoice(clash.payment_intent) is None
    await store.add_invoice(invoice(2))
    assert await store.find_invoice(clash.payment_intent) == invoice(2)


async def test_a_payment_intent_pays_for_one_invoice(store: Store) -> None:
    first = invoice(1)
    await store.add_invoice(first)
    clash = invoice(2, payment_intent=first.payment_intent)
    await conflict(store, clash)
    assert await store.get_invoice(clash.reference) is None
    assert await store.get_invoice(first.reference) == first
    assert await store.find_invoice(first.payment_intent) == first
    # The refused reference is still free.
    await store.add_invoice(replace(clash, payment_intent="pi_other"))
    assert await store.find_invoice("pi_other") == replace(clash, payment_intent="pi_other")


HOSTILE = (
    "",
    " ",
    "pi_1\x00",
    "\x00",
    "pi_1 ",
    "PI_000000000000000000000001",
    "pi_' OR '1'='1",
    "pi_1'; DROP TABLE invoices; --",
    "pi_1%",
    "pi_*",
    "*",
    "\ud800",
    "pi_\ud800",
    "pi_é",
    "pi_\n1",
    "../claim:k",
    "claim:invoice/inv_1",
    "p" * (MAX_INVOICE_ID + 1),
    "p" * 100_000,
    "pi_unknown",
    "p" * MAX_INVOICE_ID,
)


async def test_lookups_of_unknown_or_hostile_strings_find_nothing(store: Store) -> None:
    first = invoice(1)
    await store.add_invoice(first)
    await store.claim("k", owner="a", now=1)
    for value in HOSTILE:
        assert await store.get_invoice(value) is None, value
        assert await store.find_invoice(value) is None, value
    # The near miss: the right id with a NUL or a space after it.
    for value in (first.payment_intent + "\x00", first.payment_intent + " "):
        assert await store.find_invoice(value) is None
    for value in (first.reference + "\x00", first.reference.upper()):
        assert await store.get_invoice(value) is None
    # Untyped callers (a header parsed loosely) get the same answer.
    odd: Any = None
    assert await store.find_invoice(odd) is None
    # And the store still holds what it held.
    assert await store.get_invoice(first.reference) == first
    assert await store.find_invoice(first.payment_intent) == first
    assert await store.get_claim("k") == Claim("k", "a", "held", 1)


def test_lookup_ids_are_bounded() -> None:
    assert invoice_id_ok("pi_3Nq" + "x" * (MAX_INVOICE_ID - 6))
    assert not invoice_id_ok("x" * (MAX_INVOICE_ID + 1))
    assert not invoice_id_ok("")
    assert not invoice_id_ok(b"pi_1")
    assert invoice_claim_key("inv_1") == "invoice/inv_1" == INVOICE_CLAIM_PREFIX + "inv_1"


async def test_concurrent_adds_of_one_payment_intent_have_one_winner(store: Store) -> None:
    won: list[str] = []
    lost: list[str] = []

    async def attempt(n: int) -> None:
        if await added(store, invoice(n, payment_intent="pi_shared")):
            won.append(invoice(n).reference)
        else:
            lost.append(invoice(n).reference)

    async with anyio.create_task_group() as tg:
        for n in range(30):
            tg.start_soon(attempt, n)
    assert len(won) == 1
    assert len(lost) == 29
    found = await store.find_invoice("pi_shared")
    assert found is not None
    assert found.reference == won[0]
    for reference in lost:
        assert await store.get_invoice(reference) is None


@pytest.mark.parametrize("backend", SHARED)
async def test_two_stores_on_one_database_add_a_payment_intent_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    make = store_factory(backend, request, tmp_path)
    stores = [make(), make()]
    outcomes: dict[tuple[int, str], bool] = {}

    async def attempt(n: int, which: int, payment_intent: str, reference_of: int) -> None:
        new = invoice(reference_of, payment_intent=payment_intent, amount=n + 1)
        outcomes[(n, payment_intent)] = await added(stores[which], new)

    try:
        async with anyio.create_task_group() as tg:
            for n in range(20):
                # The same payment intent under distinct references...
                tg.start_soon(attempt, n, n % 2, "pi_shared", 100 + n)
                # ... and distinct payment intents under one reference.
                tg.start_soon(attempt, n, n % 2, f"pi_ref_{n}", 7)
        by_intent = [n for (n, pi), won in outcomes.items() if won and pi == "pi_shared"]
        by_reference = [n for (n, pi), won in outcomes.items() if won and pi != "pi_shared"]
        assert len(by_intent) == 1
        assert len(by_reference) == 1
        for reader in stores:
            found = await reader.find_invoice("pi_shared")
            assert found is not None
            assert found.reference == invoice(100 + by_intent[0]).reference
            assert found.amount == by_intent[0] + 1
            shared_reference = await reader.get_invoice(invoice(7).reference)
            assert shared_reference is not None
            assert shared_reference.payment_intent == f"pi_ref_{by_reference[0]}"
            for n in range(20):
                if n != by_reference[0]:
                    assert await reader.find_invoice(f"pi_ref_{n}") is None
    finally:
        for made in stores:
            await made.aclose()


# --- pruning -------------------------------------------------------------------------------------


async def test_prune_deletes_only_expired_unclaimed_invoices(store: Store) -> None:
    expired = [invoice(n, expires_at=100 + n) for n in range(1, 4)]
    held = invoice(10, expires_at=50)
    settled = invoice(11, expires_at=50)
    pending = invoice(12, expires_at=50)
    released = invoice(13, expires_at=50)
    live = invoice(20, expires_at=500)
    at_the_edge = invoice(21, expires_at=400)  # expires_at == before: not yet expired
    for each in (*expired, held, settled, pending, released, live, at_the_edge):
        await store.add_invoice(each)
    for each in (held, settled, pending, released):
        assert await store.claim(invoice_claim_key(each.reference), owner="o", now=60) is not None
    await store.finish(
        invoice_claim_key(settled.reference), owner="o", state="settled", transaction="pi_x"
    )
    await store.finish(
        invoice_claim_key(pending.reference), owner="o", state="pending", transaction=None
    )
    # A released claim was given back unused: its invoice is unpaid again.
    assert await store.release(invoice_claim_key(released.reference), owner="o")

    assert await store.prune_invoices(before=400, limit=0) == 0
    assert await store.prune_invoices(before=400, limit=2) == 2
    assert await store.prune_invoices(before=400, limit=2) == 2
    assert await store.prune_invoices(before=400) == 0
    assert await store.prune_invoices(before=400) == 0

    for gone in (*expired, released):
        assert await store.get_invoice(gone.reference) is None
        assert await store.find_invoice(gone.payment_intent) is None
    for kept in (held, settled, pending, live, at_the_edge):
        assert await store.get_invoice(kept.reference) == kept
        assert await store.find_invoice(kept.payment_intent) == kept
    # Pruned means forgotten: the reference and the payment intent may be recorded again.
    await store.add_invoice(expired[0])
    assert await store.find_invoice(expired[0].payment_intent) == expired[0]
    # Paid invoices stay whatever the cut-off; held and pending ones go once their claim does.
    assert await store.resolve(
        invoice_claim_key(pending.reference), settled=False, transaction=None
    )
    assert await store.release(invoice_claim_key(held.reference), owner="o")
    assert await store.prune_invoices(before=10_000) == 5
    assert await store.get_invoice(settled.reference) == settled
    assert await store.find_invoice(settled.payment_intent) == settled
    for gone in (held, pending, live, at_the_edge, expired[0]):
        assert await store.get_invoice(gone.reference) is None
    # Claims and the log are untouched by pruning.
    assert await store.get_claim(invoice_claim_key(settled.reference)) == Claim(
        invoice_claim_key(settled.reference), "o", "settled", 60, "pi_x"
    )


async def test_prune_limit_counts_only_deleted_invoices(store: Store) -> None:
    # Claimed invoices among the expired ones do not use up the limit.
    for n in range(6):
        each = invoice(n, expires_at=10 + n)
        await store.add_invoice(each)
        if n % 2 == 0:
            await store.claim(invoice_claim_key(each.reference), owner="o", now=1)
    assert await store.prune_invoices(before=100, limit=2) == 2
    assert await store.prune_invoices(before=100, limit=2) == 1
    remaining = [await store.get_invoice(invoice(n).reference) for n in range(6)]
    assert [found is not None for found in remaining] == [True, False] * 3


async def test_invoice_operations_of_a_closed_store_are_refused(store: Store) -> None:
    await store.add_invoice(invoice(1))
    await store.aclose()
    for call in (
        lambda: store.add_invoice(invoice(2)),
        lambda: store.get_invoice(invoice(1).reference),
        lambda: store.find_invoice(invoice(1).payment_intent),
        lambda: store.find_invoice("\x00"),
        lambda: store.prune_invoices(before=10_000),
    ):
        with pytest.raises(PaymentError) as refused:
            await call()
        assert refused.value.code == "store_unavailable"


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"amount": 0},
        {"amount": -5},
        {"amount": True},
        {"amount": 5.0},
        {"amount": "500"},
        {"amount": 2**63},
        {"currency": "USD"},
        {"currency": "us"},
        {"currency": "usdt"},
        {"currency": ""},
        {"currency": 840},
        {"reference": ""},
        {"reference": "inv 1"},
        {"reference": "inv_\x00"},
        {"reference": "x" * (MAX_INVOICE_REFERENCE + 1)},
        {"reference": None},
        {"payment_intent": ""},
        {"payment_intent": "pi_\n"},
        {"payment_intent": "x" * (MAX_INVOICE_ID + 1)},
        {"payment_intent": None},
        {"route": None},
        {"resource": b"https://api.example/"},
        {"resource": "https://api.example/\x00"},
        {"route": "GET /\ud800"},
        {"created_at": 1.5},
        {"created_at": -1},
        {"expires_at": True},
        {"created_at": 2_000, "expires_at": 1_999},
    ],
)
def test_an_invoice_refuses_bad_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        invoice(1, **changes)


def test_an_invoice_accepts_the_edges() -> None:
    edge = invoice(
        1,
        reference="r" * MAX_INVOICE_REFERENCE,
        payment_intent="p" * MAX_INVOICE_ID,
        amount=1,
        created_at=5,
        expires_at=5,
        resource="",
    )
    assert edge.amount == 1
    assert edge.expires_at == edge.created_at


# --- SQLite: persistence and the version 4 migration ---------------------------------------------


async def test_sqlite_keeps_invoices_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with await SqliteStore.open(path) as store:
        await store.add_invoice(invoice(1))
        await store.add_invoice(invoice(2, expires_at=1_000))
    async with await SqliteStore.open(path) as store:
        assert await store.find_invoice(invoice(1).payment_intent) == invoice(1)
        await conflict(store, invoice(3, payment_intent=invoice(1).payment_intent))
        assert await store.prune_invoices(before=1_500) == 1
    async with await SqliteStore.open(path) as store:
        assert await store.get_invoice(invoice(1).reference) == invoice(1)
        assert await store.get_invoice(invoice(2).reference) is None


async def test_sqlite_upgrades_a_version_3_file_in_place(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    # The file as farebox's schema version 3 wrote it: everything but the invoices.
    old_schema = [statement for statement in _SCHEMA if "invoices" not in statement]
    assert len(old_schema) == len(_SCHEMA) - 2
    conn = open_database(path, schema=old_schema, version=3, migrations=_MIGRATIONS)
    with conn:
        conn.execute(
            "INSERT INTO claims (key, owner, state, at, txn) VALUES ('k', 'o', 'settled', 5, 't')"
        )
        conn.execute(
            "INSERT INTO events (kind, at, route, reference) VALUES ('proof', 7, 'r', 'c')"
        )
        conn.execute(
            "INSERT INTO idempotency (key, fingerprint, owner, at, claim) "
            "VALUES ('i', 'f', 'o', 3, 'k')"
        )
    conn.close()
    assert SCHEMA_VERSION >= 4
    async with await SqliteStore.open(path) as store:
        await store.add_invoice(invoice(1))
        assert await store.find_invoice(invoice(1).payment_intent) == invoice(1)
        assert await store.get_claim("k") == Claim("k", "o", "settled", 5, "t")
        [event] = await store.events()
        assert event == Event("proof", 7, "r", None, "c", {}, event.id)
        entry = await store.get_idempotent("i")
        assert entry is not None
        assert entry.claim == "k"
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        indexes = {row[1] for row in check.execute("PRAGMA index_list(invoices)")}
        assert "invoices_expires_at" in indexes
    check.close()


# --- PostgreSQL: migration 0004 ------------------------------------------------------------------


@pytest.fixture
def invoice_schema() -> Iterator[str]:
    """A DSN on an empty schema of this worker's own, dropped afterwards."""
    schema = f"farebox_invoices_{worker_id()}"
    recreate_schema(schema)
    yield schema_dsn(schema)
    drop_schema(schema)


async def test_postgres_migration_0004_adds_invoices_keeping_claims(invoice_schema: str) -> None:
    known = [version for version, _ in migrations()]
    assert "0004_invoices" in known
    # The database as a farebox before 0004 left it, with a claim in it.
    with psycopg.connect(invoice_schema, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE farebox_migrations (version TEXT PRIMARY KEY,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for version, sql in migrations():
            if version < "0004":
                conn.execute(sql.encode())
                conn.execute("INSERT INTO farebox_migrations (version) VALUES (%s)", (version,))
        conn.execute("INSERT INTO claims (key, owner, state, at) VALUES ('k', 'o', 'held', 5)")
    # A store refuses the database until it is migrated.
    with pytest.raises(ConfigError, match="0004_invoices"):
        await PostgresStore.open(invoice_schema)
    assert await migrate(invoice_schema) == [v for v in known if v >= "0004"]
    assert await migrate(invoice_schema) == []
    async with await PostgresStore.open(invoice_schema) as store:
        assert await store.get_claim("k") == Claim("k", "o", "held", 5)
        await store.add_invoice(invoice(1))
        assert await store.find_invoice(invoice(1).payment_intent) == invoice(1)
    with psycopg.connect(invoice_schema, autocommit=True) as conn:
        # The database itself refuses a second invoice for one payment intent.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "INSERT INTO invoices (reference, payment_intent, route, resource, amount,"
                " currency, created_at, expires_at) VALUES ('inv_x', %s, '', '', 1, 'usd', 1, 2)",
                (invoice(1).payment_intent,),
            )
        row = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'invoices_expires_at'"
            " AND schemaname = current_schema()"
        ).fetchone()
    assert row is not None
