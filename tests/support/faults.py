"""Faults put in front of the embedded chain's RPC: everything else is answered by the chain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio

from farebox.dev.devchain import DevChain

__all__ = ["HiddenReceipts", "SlowBroadcast"]


class SlowBroadcast:
    """A node that takes ``delay`` seconds to accept a transaction (a busy node, a far RPC)."""

    def __init__(self, chain: DevChain, delay: float) -> None:
        self.inner = chain.rpc
        self.delay = delay

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        if method == "eth_sendRawTransaction":
            await anyio.sleep(self.delay)
        return await self.inner.request(method, params)


class HiddenReceipts:
    """The chain mines, but the node never reports a receipt (a node far behind, or a lost answer).

    A fault injected in front of the real chain: everything else is answered by it.
    """

    def __init__(self, chain: DevChain) -> None:
        self.inner = chain.rpc

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        if method == "eth_getTransactionReceipt":
            return None
        return await self.inner.request(method, params)
