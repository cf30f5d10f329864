"""Every store keeps the same promises: one suite, run over each implementation.

The ``store`` fixture (conftest.py) runs each protocol test over memory, SQLite, PostgreSQL and
Redis; a new store joins by adding a case there.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from farebox.errors import ConfigError, PaymentError
from farebox.store import Claim, Event, IdempotencyEntry, SqliteStore, Store, StoredResponse
from farebox.store.base import (
    MAX_EVENTS,
    clamp_limit,
    decode_event_data,
    encode_event_data,
    payer_key,
)
from farebox.store.sqlite import SCHEMA_VERSION

pytestmark = pytest.mark.anyio

PAYER = "0xAbCdEf0123456789aBcDeF0123456789AbCdEf01"
OTHER = "0x1111111111111111111111111111111111111111"


# --- claims --------------------------------------------------------------------------------------


async def test_a_key_is_claimed_once(store: Store) -> None:
    claim = await store.claim("k", owner="a", now=100)
    assert claim == Claim("k", "a", "held", 100)
    assert await store.get_claim("k") == claim
    assert await store.claim("k", owner="b", now=101) is None
    # Not even the same attempt gets it twice.
    assert await store.claim("k", owner="a", now=101) is None
    assert await store.get_claim("other") is None


async def test_release_gives_the_key_back(store: Store) -> None:
    await store.claim("k", owner="a", now=1)
    assert await store.release("k", owner="a") is True
    assert await store.get_claim("k") is None
    assert await store.release("k", owner="a") is False
    assert await store.claim("k", owner="b", now=2) == Claim("k", "b", "held", 2)


async def test_only_the_owner_releases(store: Store) -> None:
    await store.claim("k", owner="a", now=1)
    assert await store.release("k", owner="b") is False
    assert await store.get_claim("k") == Claim("k", "a", "held", 1)
    assert await store.claim("k", owner="b", now=2) is None


@pytest.mark.parametrize("state", ["settled", "pending"])
async def test_a_finished_key_is_never_released_or_claimed_again(store: Store, state: Any) -> None:
    await store.claim("k", owner="a", now=1)
    await store.finish("k", owner="a", state=state, transaction="0xabc")
    assert await store.get_claim("k") == Claim("k", "a", state, 1, "0xabc")
    assert await store.release("k", owner="a") is False
    assert await store.claim("k", owner="a", now=2) is None
    assert await store.claim("k", owner="b", now=2) is None
    assert (await store.get_claim("k")) == Claim("k", "a", state, 1, "0xabc")


async def test_finish_needs_the_owners_held_claim(store: Store) -> None:
    with pytest.raises(PaymentError) as missing:
        await store.finish("k", owner="a", state="settled", transaction=None)
    assert missing.value.code == "invalid_transaction_state"
    await store.claim("k", owner="a", now=1)
    with pytest.raises(PaymentError):
        await store.finish("k", owner="b", state="settled", transaction=None)
    await store.finish("k", owner="a", state="pending", transaction="0x1")
    with pytest.raises(PaymentError):
        await store.finish("k", owner="a", state="settled", transaction="0x1")
    assert (await store.get_claim("k")) == Claim("k", "a", "pending", 1, "0x1")
    with pytest.raises(ConfigError):
        await store.finish("k", owner="a", state="held", transaction=None)  # type: ignore[arg-type]


async def test_finish_stores_the_outcome_and_its_events_or_neither(store: Store) -> None:
    await store.claim("k", owner="a", now=1)
    good = Event("settlement", 5, "GET /x", payer=PAYER, reference="0xtx", data={"ok": True})
    bad = Event("receipt", 5, "GET /x", data={"oops": object()})
    with pytest.raises(ConfigError, match="JSON"):
        await store.finish("k", owner="a", state="settled", transaction="0xtx", events=[good, bad])
    assert await store.get_claim("k") == Claim("k", "a", "held", 1)
    assert await store.events() == []
    await store.finish("k", owner="a", state="settled", transaction="0xtx", events=[good])
    assert await store.get_claim("k") == Claim("k", "a", "settled", 1, "0xtx")
    [stored] = await store.events()
    assert stored.id is not None
    assert stored == Event("settlement", 5, "GET /x", PAYER, "0xtx", {"ok": True}, stored.id)


async def test_concurrent_claims_in_one_loop_have_one_winner(store: Store) -> None:
    winners: list[str] = []

    async def attempt(owner: str) -> None:
        if await store.claim("k", owner=owner, now=1) is not None:
            winners.append(owner)

    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(attempt, f"o{n}")
    assert len(winners) == 1


# --- recovery: unfinished claims ----------------------------------------------------------------


async def test_unfinished_lists_pending_and_old_held_claims_oldest_first(store: Store) -> None:
    for key, at in (("settled", 1), ("pending", 50), ("old-held", 10), ("new-held", 100)):
        await store.claim(key, owner="o", now=at)
    await store.finish("settled", owner="o", state="settled", transaction="0x1")
    await store.finish("pending", owner="o", state="pending", transaction="0x2")
    found = await store.unfinished(held_before=100)
    assert found == [
        Claim("old-held", "o", "held", 10),
        Claim("pending", "o", "pending", 50, "0x2"),
    ]
    assert [c.key for c in await store.unfinished(held_before=101)] == [
        "old-held",
        "pending",
        "new-held",
    ]
    assert [c.key for c in await store.unfinished(held_before=0)] == ["pending"]
    assert [c.key for c in await store.unfinished(held_before=101, limit=1)] == ["old-held"]
    assert await store.unfinished(held_before=101, limit=0) == []


async def test_resolve_settles_or_frees_an_unfinished_claim(store: Store) -> None:
    await store.claim("p", owner="o", now=1)
    await store.finish("p", owner="o", state="pending", transaction="0xp")
    await store.claim("h", owner="o", now=2)
    line = Event("settlement", 9, "GET /x", payer=PAYER, reference="0xq", data={"v": 2**255})
    assert await store.resolve("p", settled=True, transaction="0xq", events=[line]) is True
    assert await store.get_claim("p") == Claim("p", "o", "settled", 1, "0xq")
    [stored] = await store.events()
    assert stored.data == {"v": 2**255}
    # Not settled: the claim is removed and the proof may be used again.
    assert await store.resolve("h", settled=False, transaction=None) is True
    assert await store.get_claim("h") is None
    assert await store.claim("h", owner="n", now=3) == Claim("h", "n", "held", 3)
    assert await store.unfinished(held_before=3) == []


async def test_resolve_changes_nothing_when_someone_else_resolved_first(store: Store) -> None:
    await store.claim("k", owner="o", now=1)
    await store.finish("k", owner="o", state="pending", transaction="0x1")
    assert await store.resolve("k", settled=True, transaction="0x1", events=[Event("a", 1)])
    assert not await store.resolve("k", settled=False, transaction=None, events=[Event("b", 2)])
    assert not await store.resolve("gone", settled=True, transaction="0x", events=[Event("c", 3)])
    assert await store.get_claim("k") == Claim("k", "o", "settled", 1, "0x1")
    assert [event.kind for event in await store.events()] == ["a"]
    # A held claim finished by its request before the reconciler got to it.
    await store.claim("j", owner="o", now=1)
    await store.finish("j", owner="o", state="settled", transaction="0x2")
    assert not await store.resolve("j", settled=False, transaction=None)
    assert await store.get_claim("j") == Claim("j", "o", "settled", 1, "0x2")


async def test_concurrent_resolves_have_one_winner(store: Store) -> None:
    await store.claim("k", owner="o", now=1)
    await store.finish("k", owner="o", state="pending", transaction="0x1")
    results: list[bool] = []

    async def attempt(n: int) -> None:
        results.append(
            await store.resolve("k", settled=n % 2 == 0, transaction="0x1", events=[Event("r", n)])
        )

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(attempt, n)
    assert results.count(True) == 1
    assert len(await store.events()) == 1


# --- idempotency ---------------------------------------------------------------------------------

RESPONSE = StoredResponse(
    201, (("content-type", "text/plain"), ("x-a", "1"), ("x-a", "2")), b"\0ok"
)


async def test_idempotency_begin_complete_get(store: Store) -> None:
    assert await store.get_idempotent("i") is None
    assert await store.begin_idempotent("i", fingerprint="f1", owner="a", now=5) is None
    running = IdempotencyEntry("i", "f1", "a", 5)
    assert await store.get_idempotent("i") == running
    # Anyone else, with any fingerprint, finds the entry unchanged.
    assert await store.begin_idempotent("i", fingerprint="f2", owner="b", now=6) == running
    assert await store.begin_idempotent("i", fingerprint="f1", owner="a", now=6) == running
    with pytest.raises(PaymentError):
        await store.complete_idempotent("i", owner="b", response=RESPONSE)
    await store.complete_idempotent("i", owner="a", response=RESPONSE)
    done = IdempotencyEntry("i", "f1", "a", 5, RESPONSE)
    assert await store.get_idempotent("i") == done
    assert await store.begin_idempotent("i", fingerprint="f1", owner="c", now=7) == done
    with pytest.raises(PaymentError):
        await store.complete_idempotent("i", owner="a", response=RESPONSE)
    with pytest.raises(PaymentError):
        await store.complete_idempotent("missing", owner="a", response=RESPONSE)


async def test_idempotency_keeps_the_claim_of_the_running_request(store: Store) -> None:
    assert await store.begin_idempotent("i", fingerprint="f", owner="a", now=5, claim="c1") is None
    running = IdempotencyEntry("i", "f", "a", 5, claim="c1")
    assert await store.get_idempotent("i") == running
    # A loser gets the winner's entry, claim included, never its own.
    assert await store.begin_idempotent("i", fingerprint="f", owner="b", now=6, claim="c2") == (
        running
    )
    await store.complete_idempotent("i", owner="a", response=RESPONSE)
    assert await store.get_idempotent("i") == IdempotencyEntry(
        "i", "f", "a", 5, RESPONSE, claim="c1"
    )
    # Without a claim (older callers) the entry has none.
    assert await store.begin_idempotent("j", fingerprint="f", owner="a", now=5) is None
    entry = await store.get_idempotent("j")
    assert entry is not None
    assert entry.claim is None


async def test_idempotency_abandon(store: Store) -> None:
    await store.begin_idempotent("i", fingerprint="f", owner="a", now=1)
    assert await store.abandon_idempotent("i", owner="b") is False
    assert await store.abandon_idempotent("i", owner="a") is True
    assert await store.get_idempotent("i") is None
    assert await store.abandon_idempotent("i", owner="a") is False
    assert await store.begin_idempotent("i", fingerprint="g", owner="b", now=2) is None
    await store.complete_idempotent("i", owner="b", response=RESPONSE)
    assert await store.abandon_idempotent("i", owner="b") is False  # a completed entry stays
    entry = await store.get_idempotent("i")
    assert entry is not None
    assert entry.response == RESPONSE


async def test_concurrent_begin_idempotent_has_one_winner(store: Store) -> None:
    results: dict[str, IdempotencyEntry | None] = {}

    async def attempt(owner: str) -> None:
        results[owner] = await store.begin_idempotent("i", fingerprint="f", owner=owner, now=1)

    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(attempt, f"o{n}")
    winners = [owner for owner, entry in results.items() if entry is None]
    assert len(winners) == 1
    assert {entry.owner for entry in results.values() if entry is not None} == set(winners)


# --- the log -------------------------------------------------------------------------------------


async def _fill(store: Store) -> None:
    await store.append(
        Event("challenge", 100, "GET /weather", reference="c1"),
        Event("proof", 101, "GET /weather", payer=PAYER, reference="c1", data={"n": 1}),
        Event("settlement", 102, "GET /weather", payer=PAYER, reference="0xt1"),
        Event("challenge", 103, "POST /search", reference="c2"),
        Event("proof", 104, "POST /search", payer=OTHER, reference="c2"),
        Event("refusal", 105, "POST /search", payer="did:key:z6MkAbC", data={"code": "x"}),
    )
    # Appended later but stamped earlier (another process's clock): ordered by time, not arrival.
    await store.append(Event("settlement", 99, "GET /weather", payer=PAYER.lower()))


def _shape(events: list[Event]) -> list[tuple[str, int]]:
    return [(event.kind, event.at) for event in events]


async def test_events_newest_first_with_ids(store: Store) -> None:
    await _fill(store)
    found = await store.events()
    assert [event.at for event in found] == [105, 104, 103, 102, 101, 100, 99]
    ids = [event.id for event in found]
    assert None not in ids
    assert len(set(ids)) == len(ids)
    assert found[-1].id == max(i for i in ids if i is not None)  # appended last


async def test_events_filters(store: Store) -> None:
    await _fill(store)
    by_payer = await store.events(payer=PAYER.upper().replace("0X", "0x"))
    assert _shape(by_payer) == [("settlement", 102), ("proof", 101), ("settlement", 99)]
    assert {event.payer for event in by_payer} == {PAYER, PAYER.lower()}  # as written
    assert _shape(await store.events(payer="did:key:z6MkAbC")) == [("refusal", 105)]
    assert await store.events(payer="did:key:z6mkabc") == []  # only 0x addresses fold case
    assert _shape(await store.events(route="POST /search")) == [
        ("refusal", 105),
        ("proof", 104),
        ("challenge", 103),
    ]
    assert _shape(await store.events(kind="challenge")) == [("challenge", 103), ("challenge", 100)]
    assert _shape(await store.events(since=101, until=104)) == [
        ("challenge", 103),
        ("settlement", 102),
        ("proof", 101),
    ]
    assert _shape(await store.events(reference="c1")) == [("proof", 101), ("challenge", 100)]
    assert _shape(await store.events(kind="proof", route="GET /weather", payer=PAYER)) == [
        ("proof", 101)
    ]
    assert _shape(await store.events(limit=2)) == [("refusal", 105), ("proof", 104)]
    assert await store.events(limit=0) == []
    assert await store.events(kind="nothing") == []
    [proof] = await store.events(kind="proof", payer=PAYER)
    assert proof.data == {"n": 1}


async def test_event_data_round_trips_exactly(store: Store) -> None:
    data = {
        "amount": 2**256 - 1,
        "small": -(2**63),
        "nested": {"list": [1, "two", None, True], "deeper": {"x": 1.5}},
        "text": "ünïcode ✓",
    }
    await store.append(Event("proof", 1, data=data), Event("challenge", 2))
    second, first = await store.events()
    assert first.data == data
    assert second.data == {}
    with pytest.raises(TypeError):
        first.data["amount"] = 0  # type: ignore[index]


async def test_append_is_all_or_nothing(store: Store) -> None:
    with pytest.raises(ConfigError):
        await store.append(Event("a", 1), Event("b", 2, data={"bad": {1, 2}}))
    assert await store.events() == []
    await store.append()
    assert await store.events() == []


async def test_a_closed_store_refuses_work(store: Store) -> None:
    await store.claim("k", owner="a", now=1)
    await store.aclose()
    with pytest.raises(PaymentError) as closed:
        await store.claim("j", owner="a", now=1)
    assert closed.value.code == "store_unavailable"
    assert closed.value.status == 503
    with pytest.raises(PaymentError):
        await store.events()
    await store.aclose()  # twice is fine


async def test_stores_implement_the_protocol(store: Store) -> None:
    assert isinstance(store, Store)


def test_helpers() -> None:
    assert payer_key(PAYER) == PAYER.lower()
    assert payer_key("0X" + PAYER[2:]) == PAYER.lower()
    assert payer_key("did:key:AbC") == "did:key:AbC"
    assert clamp_limit(10**9) == MAX_EVENTS == 10_000
    assert clamp_limit(-5) == 0
    assert encode_event_data({}) == "{}"
    assert decode_event_data(encode_event_data({"a": 2**200})) == {"a": 2**200}
    with pytest.raises(ConfigError):
        encode_event_data({"a": float("nan"), "b": 2**70})
    with pytest.raises(ConfigError):
        encode_event_data({1: "non-string key"})  # type: ignore[dict-item]


# --- SQLite specifics ------------------------------------------------------------------------------


async def test_sqlite_constructs_without_io_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "store.db"
    store = SqliteStore(path)
    assert not path.parent.exists()
    assert await store.claim("k", owner="a", now=1) is not None
    await store.finish("k", owner="a", state="settled", transaction="0xt", events=[Event("x", 1)])
    await store.aclose()
    async with await SqliteStore.open(path) as again:
        assert await again.get_claim("k") == Claim("k", "a", "settled", 1, "0xt")
        assert await again.claim("k", owner="b", now=2) is None
        assert [event.kind for event in await again.events()] == ["x"]


async def test_sqlite_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        await store.claim("k", owner="a", now=1)
        for name in ("store.db", "store.db-wal", "store.db-shm"):
            mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
            assert mode & 0o077 == 0, (name, oct(mode))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


@pytest.mark.parametrize("where", ["under_a_file", "a_directory", "not_a_database"])
async def test_sqlite_failures_are_store_unavailable(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "secret-name"
    if where == "under_a_file":
        blocker.write_text("x")
        path = blocker / "store.db"
    elif where == "a_directory":
        blocker.mkdir()
        path = blocker
    else:
        blocker.write_bytes(b"this is not SQLite" * 100)
        path = blocker
    store = SqliteStore(path)
    with pytest.raises(PaymentError) as failed:
        await store.claim("k", owner="a", now=1)
    assert failed.value.code == "store_unavailable"
    assert failed.value.status == 503
    assert isinstance(failed.value.__cause__, OSError | sqlite3.Error)
    assert "secret-name" not in str(failed.value)
    assert "secret-name" not in json.dumps(failed.value.to_problem())
    with pytest.raises(PaymentError):
        await SqliteStore.open(path)
    await store.aclose()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(PaymentError, match="newer"):
        await SqliteStore.open(path)


async def test_sqlite_runs_short_operations_in_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hop to a worker thread costs more than the operations themselves (see SqliteStore).
    store = await SqliteStore.open(tmp_path / "store.db")

    async def no_threads(*args: object, **kwargs: object) -> None:
        raise AssertionError("ran in a worker thread")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)
    assert await store.claim("k", owner="a", now=1) is not None
    assert await store.release("k", owner="a") is True
    assert await store.claim("k", owner="a", now=1) is not None
    await store.finish("k", owner="a", state="settled", transaction="0x1", events=[Event("x", 1)])
    await store.append(Event("y", 2))
    assert await store.get_claim("k") is not None
    monkeypatch.undo()
    await store.aclose()


async def test_sqlite_waits_for_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = await SqliteStore.open(path, busy_timeout=5)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    results: list[Claim | None] = []

    async def claim() -> None:
        results.append(await store.claim("k", owner="a", now=1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(claim)
        # The claim found the file locked and waits in a worker thread, not in the loop: the loop
        # keeps running and the other writer can finish.
        await anyio.sleep(0.05)
        assert results == []
        other.execute("COMMIT")
    assert results == [Claim("k", "a", "held", 1)]
    other.close()
    await store.aclose()


async def test_sqlite_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = await SqliteStore.open(path, busy_timeout=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(PaymentError) as busy:
        await store.claim("k", owner="a", now=1)
    assert busy.value.code == "store_unavailable"
    other.execute("ROLLBACK")
    other.close()
    assert await store.claim("k", owner="a", now=1) is not None
    await store.aclose()


async def test_sqlite_checkpoints_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        for n in range(300):
            await store.append(Event("challenge", n, "GET /x", reference=f"c{n}", data={"n": n}))
        assert len(await store.events(limit=1000)) == 300
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (300,)
    conn.close()


CHILD = textwrap.dedent(
    """
    import json, sys
    import anyio
    from farebox.store.sqlite import SqliteStore

    async def main(path, name):
        store = await SqliteStore.open(path)
        print("ready", flush=True)
        sys.stdin.readline()
        won = []
        for n in range(50):
            if await store.claim("the-key", owner=f"{name}-{n}", now=1) is not None:
                won.append("the-key")
            if await store.claim(f"key-{n}", owner=name, now=1) is not None:
                won.append(f"key-{n}")
        await store.aclose()
        print(json.dumps(won), flush=True)

    anyio.run(main, sys.argv[1], sys.argv[2])
    """
)


def test_two_processes_racing_on_one_file_have_one_winner_per_key(tmp_path: Path) -> None:
    path = str(tmp_path / "store.db")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, path, name],
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
    assert won.count("the-key") == 1
    assert sorted(won) == sorted(["the-key", *(f"key-{n}" for n in range(50))])
