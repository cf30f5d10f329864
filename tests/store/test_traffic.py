"""Traffic (challenges, refusals, replays) is counted and prunable; the payment log is neither
pruned nor changed. On every store."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from farebox.store import SqliteStore
from farebox.store.base import TRAFFIC_DAY, Event, Store, TrafficCount

pytestmark = pytest.mark.anyio

DAY = 20_000 * TRAFFIC_DAY  # a day's start, in unix seconds


def _challenge(at: int, route: str = "GET /a") -> Event:
    return Event("challenge", at, route, reference=f"ref-{at}")


def _refusal(at: int, code: str) -> Event:
    return Event("refusal", at, "GET /a", payer="0xAbC", data={"code": code})


async def test_traffic_is_counted_by_day_route_and_code(store: Store) -> None:
    await store.append(_challenge(DAY + 1), _challenge(DAY + 2), _challenge(DAY + 3, "GET /b"))
    await store.append(_refusal(DAY + 4, "proof_replayed"), _refusal(DAY + 5, "proof_replayed"))
    await store.append(Event("replay", DAY + TRAFFIC_DAY, "GET /a", data={"status": 200}))
    # The payment log is not traffic: not counted.
    await store.append(Event("settlement", DAY + 6, "GET /a", reference="0x1"))
    assert await store.traffic_counts() == [
        TrafficCount(DAY, "challenge", "GET /a", "", 2),
        TrafficCount(DAY, "challenge", "GET /b", "", 1),
        TrafficCount(DAY, "refusal", "GET /a", "proof_replayed", 2),
        TrafficCount(DAY + TRAFFIC_DAY, "replay", "GET /a", "", 1),
    ]
    assert await store.traffic_counts(since=DAY + 1) == [
        TrafficCount(DAY + TRAFFIC_DAY, "replay", "GET /a", "", 1)
    ]
    assert await store.prune_traffic_counts(before=DAY + 1) == 3
    assert await store.traffic_counts() == [
        TrafficCount(DAY + TRAFFIC_DAY, "replay", "GET /a", "", 1)
    ]


async def test_pruning_takes_old_traffic_and_keeps_the_payment_log(store: Store) -> None:
    await store.append(Event("proof", DAY, "GET /a", payer="0xAbC", reference="r"))
    for at in range(DAY + 1, DAY + 31):
        await store.append(_challenge(at))
    await store.append(_refusal(DAY + 40, "invalid_exact_evm_payload_signature"))
    await store.append(Event("settlement", DAY + 50, "GET /a", payer="0xAbC", reference="0x1"))
    # Older than DAY + 11: ten challenges.
    assert await store.prune_traffic(before=DAY + 11, keep=1000) == 10
    challenges = await store.events(kind="challenge", limit=1000)
    assert sorted(e.at for e in challenges) == list(range(DAY + 11, DAY + 31))
    # Beyond the newest 5 traffic events (the refusal and four challenges), the rest goes, at
    # most `limit` at a time.
    assert await store.prune_traffic(before=0, keep=5, limit=7) == 7
    assert await store.prune_traffic(before=0, keep=5) == 9
    assert await store.prune_traffic(before=0, keep=5) == 0
    left = await store.events(limit=1000)
    assert [(e.kind, e.at) for e in left] == [
        ("settlement", DAY + 50),
        ("refusal", DAY + 40),
        *[("challenge", at) for at in range(DAY + 30, DAY + 26, -1)],
        ("proof", DAY),
    ]
    # Indexes were pruned with the events: the reference and payer lookups still agree.
    assert await store.events(reference=f"ref-{DAY + 1}") == []
    assert [e.kind for e in await store.events(payer="0xabc")] == [
        "settlement",
        "refusal",
        "proof",
    ]
    # Counts stay after their events are gone.
    [count] = [c for c in await store.traffic_counts() if c.kind == "challenge"]
    assert count.count == 30


async def test_pruning_never_takes_the_newest_event_so_ids_stay_unique(store: Store) -> None:
    await store.append(_challenge(DAY), _challenge(DAY + 1))
    assert await store.prune_traffic(before=DAY + 100, keep=0) == 1
    await store.append(_challenge(DAY + 2))
    ids = [e.id for e in await store.events(limit=10)]
    assert len(set(ids)) == len(ids) == 2


async def test_sqlite_keeps_the_payment_log_append_only(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with await SqliteStore.open(path) as store:
        await store.append(Event("settlement", DAY, "GET /a"), _challenge(DAY), _challenge(DAY))
    with sqlite3.connect(path) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events WHERE kind = 'settlement'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET kind = 'challenge'")
        assert conn.execute("DELETE FROM events WHERE kind = 'challenge'").rowcount == 2
    conn.close()


async def test_sqlite_version_4_file_becomes_prunable(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with await SqliteStore.open(path) as store:
        await store.append(_challenge(DAY), _challenge(DAY + 1), _challenge(DAY + 2))
    with sqlite3.connect(path) as conn:  # as farebox 4 left the file: every delete refused
        conn.execute("DROP TRIGGER events_no_delete")
        conn.execute(
            "CREATE TRIGGER events_no_delete BEFORE DELETE ON events"
            " BEGIN SELECT RAISE(ABORT, 'the payment log is append-only'); END"
        )
        conn.execute("DROP TABLE traffic_counts")
        conn.execute("PRAGMA user_version = 4")
    conn.close()
    async with await SqliteStore.open(path) as store:
        assert await store.prune_traffic(before=DAY + 2, keep=10) == 2
        await store.append(_challenge(DAY + 3))
        assert [c.count for c in await store.traffic_counts()] == [1]


async def test_postgres_keeps_the_payment_log_append_only(empty_postgres: str) -> None:
    from farebox.store.postgres import PostgresStore

    async with await PostgresStore.open(empty_postgres) as store:
        await store.append(Event("settlement", DAY, "GET /a"), _challenge(DAY))
    with psycopg.connect(empty_postgres, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM events WHERE kind = 'settlement'")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("UPDATE events SET route = 'x' WHERE kind = 'challenge'")
        assert conn.execute("DELETE FROM events WHERE kind = 'challenge'").rowcount == 1


async def test_unpaid_traffic_through_the_gate_stays_bounded(store: Store) -> None:
    """3,000 unpaid requests and 300 forged payments: every one counted, and after a reconciler
    pass at most ``traffic_keep`` of their events remain; the payment log is untouched."""
    import httpx

    from farebox.facilitator.local import LocalFacilitator
    from farebox.money import DEVCHAIN_USDC
    from farebox.ops.reconcile import Reconciler
    from farebox.receipts import SigningKey
    from farebox.server.asgi import PaymentMiddleware
    from farebox.server.gate import Gate
    from farebox.server.routes import RouteTable

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"paid"})

    routes = RouteTable()
    routes.add("GET", "/weather", 10_000, assets=DEVCHAIN_USDC, pay_to="0x" + "5b" * 20)
    gate = Gate(routes, LocalFacilitator([]), store, signing_key=SigningKey.generate())
    await store.append(Event("settlement", DAY, "GET /weather", reference="0x1"))
    transport = httpx.ASGITransport(app=PaymentMiddleware(app, gate))
    async with httpx.AsyncClient(transport=transport, base_url="https://api.test") as client:
        for _ in range(3_000):
            assert (await client.get("/weather")).status_code == 402
        for _ in range(300):
            forged = await client.get("/weather", headers={"payment-signature": "bm90IGEgcHJvb2Y"})
            assert forged.status_code == 400
    counts = {(c.kind, c.code): c.count for c in await store.traffic_counts()}
    assert counts[("challenge", "")] == 3_000
    assert sum(n for (kind, _), n in counts.items() if kind == "refusal") == 300
    assert len(await store.events(kind="challenge", limit=10_000)) == 3_000
    report = await Reconciler(store, [], traffic_keep=100).run_once()
    assert report.traffic_pruned == 3_200
    left = await store.events(limit=10_000)
    assert len([e for e in left if e.kind in ("challenge", "refusal")]) == 100
    assert [e.kind for e in left if e.kind == "settlement"] == ["settlement"]
    # The counts outlive their events.
    again = {(c.kind, c.code): c.count for c in await store.traffic_counts()}
    assert again == counts


def test_the_postgres_migration_names_the_traffic_kinds_farebox_uses() -> None:
    """0005 spells the kinds out (SQL migrations are fixed text): they must stay these."""
    import re

    from farebox.store.base import TRAFFIC_KINDS
    from farebox.store.postgres import migrations

    [sql] = [text for version, text in migrations() if version == "0005_traffic"]
    lists = re.findall(r"kind IN \(([^)]*)\)", sql)
    assert len(lists) == 2  # the index and the trigger function
    for found in lists:
        assert tuple(k.strip().strip("'") for k in found.split(",")) == TRAFFIC_KINDS


async def test_sqlite_prunes_through_the_traffic_index(tmp_path: Path) -> None:
    """Pruning walks traffic events only: without the partial index it would scan the whole
    payment log under the write lock on every pass."""
    from farebox.store.sqlite import _TRAFFIC

    path = tmp_path / "store.db"
    async with await SqliteStore.open(path) as store:
        await store.append(_challenge(DAY))
    with sqlite3.connect(path) as conn:
        for sql, params in ((_TRAFFIC.cut, (5,)), (_TRAFFIC.prune, (1, 2, 3))):
            plan = " ".join(
                str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)
            )
            assert "events_traffic" in plan, plan
    conn.close()
