"""What the agent's reconcile asks a node: one block for the timestamp and the state, and log
searches bounded by time (a provider refuses a search from the first block)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio

from farebox.agent.budget import Budget, SentAuthorization
from farebox.agent.reconcile import reconcile
from farebox.ledgers.evm import EvmReader
from farebox.ledgers.rpc import RpcError
from farebox.money import BASE_SEPOLIA_USDC

USDC = BASE_SEPOLIA_USDC
HEAD = 30_000_000
HEAD_TIME = 1_800_000_000
BLOCK_SECONDS = 2


class Node:
    """A node of a chain with a block every two seconds, answering the JSON-RPC methods the
    reconcile uses as a node does (a fake: it records each call; the nonce reads as consumed
    when ``used``); it refuses a log search over more than ``max_range`` blocks, as providers do."""

    def __init__(self, *, used: bool, max_range: int = 10_000) -> None:
        self.used = used
        self.max_range = max_range
        self.calls: list[tuple[str, list[Any]]] = []

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        self.calls.append((method, list(params)))
        if method == "eth_getBlockByNumber":
            tag = params[0]
            number = HEAD if tag == "latest" else int(tag, 16)
            stamp = HEAD_TIME - (HEAD - number) * BLOCK_SECONDS
            return {"number": hex(number), "timestamp": hex(stamp)}
        if method == "eth_call":
            return "0x" + ("1" if self.used else "0").rjust(64, "0")
        if method == "eth_getLogs":
            query = params[0]
            start = 0 if query["fromBlock"] == "earliest" else int(query["fromBlock"], 16)
            if HEAD - start > self.max_range:
                raise RpcError(-32005, "query exceeds max block range 10000")
            return [{"transactionHash": "0x" + "ab" * 32}]
        raise AssertionError(f"unexpected {method}")


def budget_with_one(signed_at: int, valid_before: int) -> Budget:
    budget = Budget.from_prices(None, per_day="$1")
    authorization = SentAuthorization(
        USDC.network, USDC.address, "0x" + "11" * 20, "0x" + "22" * 32, valid_before
    )
    budget.reserve(10_000, asset=USDC, now=signed_at, authorization=authorization)
    return budget


def run(budget: Budget, node: Node) -> Any:
    async def go() -> Any:
        return await reconcile(budget, [EvmReader(node, network=USDC.network)])

    return anyio.run(go)


def test_the_state_is_read_at_the_block_whose_time_is_compared() -> None:
    node = Node(used=False)
    budget = budget_with_one(HEAD_TIME - 3600, HEAD_TIME - 3000)
    report = run(budget, node)
    assert [r.outcome for r in report.released] == ["expired"]
    (call,) = [params for method, params in node.calls if method == "eth_call"]
    assert call[1] == hex(HEAD)  # not "latest": the block the timestamp came from


def test_the_log_search_starts_about_when_the_authorization_was_signed() -> None:
    node = Node(used=True)
    signed_at = HEAD_TIME - 3600  # 1800 blocks ago
    report = run(budget_with_one(signed_at, signed_at + 300), node)
    assert [r.outcome for r in report.committed] == ["used"]
    assert report.committed[0].transaction == "0x" + "ab" * 32
    (query,) = [params[0] for method, params in node.calls if method == "eth_getLogs"]
    start = int(query["fromBlock"], 16)
    # From validAfter (signed_at - 600 s), with a margin: within the node's 10,000-block cap,
    # and never after the first block the authorization could be used in.
    first_usable = HEAD - (HEAD_TIME - (signed_at - 600)) // BLOCK_SECONDS
    assert HEAD - 10_000 <= start <= first_usable


def test_a_log_search_the_node_refuses_leaves_it_counted_for_the_next_pass() -> None:
    node = Node(used=True, max_range=10)
    budget = budget_with_one(HEAD_TIME - 3600, HEAD_TIME - 3300)
    report = run(budget, node)
    assert [r.outcome for r in report.pending] == ["unreadable"]
    assert "max block range" in report.pending[0].detail
    assert budget.spent(now=HEAD_TIME).outstanding_count == 1
