"""Every store against the lifecycle table: each move the table allows does what it says, and each
move it does not allow is refused and changes nothing, on memory, SQLite, PostgreSQL and Redis."""

from __future__ import annotations

import itertools
import uuid

import pytest

from farebox.errors import ConfigError, PaymentError
from farebox.protocol.lifecycle import STATES, TRANSITIONS, ClaimState, Move, next_state
from farebox.store.base import Store

pytestmark = pytest.mark.anyio

OWNER = "owner-1"
NOW = 1_700_000_000


async def put(store: Store, state: ClaimState | None) -> str:
    """A fresh key whose claim is in ``state``, made with the store's own moves."""
    key = f"eip155:1/0x{uuid.uuid4().hex}"
    if state is None:
        return key
    assert await store.claim(key, owner=OWNER, now=NOW) is not None
    if state != "held":
        await store.finish(key, owner=OWNER, state=state, transaction="0x" + "ab" * 32)
    return key


async def state_of(store: Store, key: str) -> ClaimState | None:
    claim = await store.get_claim(key)
    return None if claim is None else claim.state


async def make(store: Store, key: str, move: Move) -> bool:
    """Try ``move`` through the store's method for it; whether the store made it."""
    if move == "claim":
        return await store.claim(key, owner=OWNER, now=NOW + 1) is not None
    if move == "release":
        return await store.release(key, owner=OWNER)
    if move in ("settle", "hold_pending"):
        finished = "settled" if move == "settle" else "pending"
        try:
            await store.finish(key, owner=OWNER, state=finished, transaction="0x" + "cd" * 32)
        except PaymentError as exc:
            if exc.code != "invalid_transaction_state":
                raise
            return False
        return True
    settled = move == "confirm"
    return await store.resolve(
        key, settled=settled, transaction="0x" + "ef" * 32 if settled else None
    )


CASES = list(itertools.product((None, *STATES), TRANSITIONS))


@pytest.mark.parametrize(("before", "move"), CASES, ids=[f"{b}-{m}" for b, m in CASES])
async def test_the_store_makes_exactly_the_moves_of_the_table(
    store: Store, before: ClaimState | None, move: Move
) -> None:
    key = await put(store, before)
    allowed = before in TRANSITIONS[move]
    assert await make(store, key, move) is allowed
    expected = next_state(before, move) if allowed else before
    assert await state_of(store, key) == expected


def test_next_state_refuses_what_the_table_does_not_allow() -> None:
    assert next_state("held", "settle") == "settled"
    assert next_state("pending", "drop") is None
    with pytest.raises(ConfigError):
        next_state("settled", "release")
    with pytest.raises(ConfigError):
        next_state(None, "settle")
