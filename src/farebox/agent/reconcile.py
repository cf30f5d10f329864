"""Settle the agent's budget from the chain: what became of each authorization that left it.

A signed authorization that left the agent counts as spent (see :mod:`farebox.agent.budget`) until
the chain says what became of it. :func:`reconcile` asks, for each outstanding one, the token that
would move it:

- ``authorizationState`` says the nonce was consumed, and the token logged ``AuthorizationUsed``:
  the money moved (``used``, with the transaction). Consumed without an ``AuthorizationUsed`` log
  but with ``AuthorizationCanceled``: the agent's owner cancelled it (``cancelled``, released).
  Consumed and neither log found (a node that prunes logs): counted as ``used``; when unsure,
  the money is spent.
- Not consumed, and the latest block is dated at least ``grace`` seconds past its
  ``validBefore``: no later block can use it (``expired``, released). The state is read at that
  very block (by number), so the two facts are about one block; the grace covers a shallow
  reorganisation back to a block from before ``validBefore``.
- Not consumed and not yet expired: ``waiting`` (it still counts); so does every authorization
  on a network no chain was given for, or whose node did not answer (``unreadable``).

The agent runs it on start (``farebox budget reconcile``, or ``farebox get --rpc-url``); it is
safe to run from several processes at once: a resolved authorization is never changed again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import anyio

from farebox.agent.budget import Budget, Outstanding
from farebox.errors import ConfigError, FareboxError, PaymentError
from farebox.eth import address_bytes
from farebox.ledgers.evm import EvmReader
from farebox.ledgers.rpc import HttpRpc, RpcError, RpcUnavailable
from farebox.schemes.evm_exact import VALID_AFTER_SLACK

__all__ = [
    "RELEASE_GRACE",
    "AuthorizationChain",
    "Reconciliation",
    "Resolution",
    "open_chains",
    "reconcile",
    "reconcile_sync",
]

#: Seconds past ``validBefore`` the chain's latest block must be before an unused authorization
#: is released: longer than any reorganisation the supported chains see in practice.
RELEASE_GRACE = 120


class AuthorizationChain(Protocol):
    """What :func:`reconcile` reads from one network (:class:`farebox.ledgers.evm.EvmReader`)."""

    network: str

    async def latest_block(self) -> tuple[int, int]: ...

    async def authorization_used(
        self, token: str, authorizer: bytes, nonce: bytes, *, block: int | None = None
    ) -> bool: ...

    async def authorization_transaction(
        self, token: str, authorizer: bytes, nonce: bytes, *, since: int | None = None
    ) -> str | None: ...

    async def authorization_cancellation(
        self, token: str, authorizer: bytes, nonce: bytes, *, since: int | None = None
    ) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Resolution:
    """What one reconciliation found about one outstanding authorization.

    ``outcome`` is ``used``, ``cancelled``, ``expired`` (recorded in the budget), ``waiting``
    (still valid: it keeps counting) or ``unreadable`` (no chain or no answer: it keeps counting).
    """

    outstanding: Outstanding
    outcome: str
    transaction: str | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        authorization = self.outstanding.authorization
        return {
            "reservation": self.outstanding.reservation,
            "outcome": self.outcome,
            "network": authorization.network,
            "token": authorization.token,
            "nonce": authorization.nonce,
            "amount": str(self.outstanding.asset_amount),
            "payee": self.outstanding.payee,
            "resource": self.outstanding.resource,
            "valid_before": authorization.valid_before,
            "transaction": self.transaction,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """Every resolution of one pass, and the budget units it released and confirmed spent."""

    resolutions: tuple[Resolution, ...]

    def _of(self, *outcomes: str) -> list[Resolution]:
        return [r for r in self.resolutions if r.outcome in outcomes]

    @property
    def committed(self) -> list[Resolution]:
        """Moved money on chain: spent for good."""
        return self._of("used")

    @property
    def released(self) -> list[Resolution]:
        """Can never move money: no longer counted."""
        return self._of("cancelled", "expired")

    @property
    def pending(self) -> list[Resolution]:
        """Still counted: valid, or not readable now."""
        return self._of("waiting", "unreadable")

    @property
    def released_units(self) -> int:
        return sum(r.outstanding.amount for r in self.released)

    def to_json(self) -> dict[str, Any]:
        return {
            "committed": len(self.committed),
            "released": len(self.released),
            "pending": len(self.pending),
            "released_units": str(self.released_units),
            "authorizations": [r.to_json() for r in self.resolutions],
        }


async def _resolve(
    budget: Budget,
    item: Outstanding,
    chain: AuthorizationChain,
    latest: tuple[int, int],
    grace: int,
    now: int,
) -> Resolution:
    authorization = item.authorization
    token, authorizer = authorization.token, address_bytes(authorization.authorizer)
    nonce = bytes.fromhex(authorization.nonce.removeprefix("0x"))
    number, block_time = latest
    # The state of the very block whose timestamp is compared: two separate "latest" reads
    # may reach two nodes of a load-balanced provider, one of them behind.
    if await chain.authorization_used(token, authorizer, nonce, block=number):
        # No transaction can be older than the authorization's validAfter (signed as at - slack).
        since = item.at - VALID_AFTER_SLACK
        used = await chain.authorization_transaction(token, authorizer, nonce, since=since)
        if used is not None:
            budget.resolve(item.reservation, "used", now=now, transaction=used)
            return Resolution(item, "used", used)
        cancelled = await chain.authorization_cancellation(token, authorizer, nonce, since=since)
        if cancelled is not None:
            budget.resolve(item.reservation, "cancelled", now=now, transaction=cancelled)
            return Resolution(item, "cancelled", cancelled)
        budget.resolve(item.reservation, "used", now=now)
        return Resolution(item, "used", None, "the nonce is consumed; the node returned no log")
    release_at = authorization.valid_before + grace
    if block_time >= release_at:
        budget.resolve(item.reservation, "expired", now=now)
        return Resolution(item, "expired")
    return Resolution(
        item,
        "waiting",
        detail=f"valid until {authorization.valid_before}; released from {release_at}",
    )


async def reconcile(
    budget: Budget,
    chains: Iterable[AuthorizationChain | str],
    *,
    grace: int = RELEASE_GRACE,
    now: int | None = None,
) -> Reconciliation:
    """Read the chain for each outstanding authorization in ``budget`` and commit or release it
    (see the module docstring). ``chains`` are readers, one per network, or JSON-RPC URLs (each
    opened for this pass, its network named by the node's chain id); ``now`` (unix seconds,
    default the clock) only dates the records."""
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 0:
        raise ValueError("grace is a non-negative int of seconds")
    given = list(chains)
    if not budget.outstanding(limit=1):
        return Reconciliation(())  # nothing to ask: no node is needed (or opened)
    urls = [c for c in given if isinstance(c, str)]
    opened = await open_chains(urls) if urls else []
    try:
        readers = [c for c in given if not isinstance(c, str)] + opened
        return await _reconcile(budget, readers, grace, int(time.time()) if now is None else now)
    finally:
        for reader in opened:
            await reader.aclose()


async def _reconcile(
    budget: Budget, chains: Sequence[AuthorizationChain], grace: int, now: int
) -> Reconciliation:
    by_network = {chain.network: chain for chain in chains}
    latest: dict[str, tuple[int, int] | str] = {}  # network -> latest (number, time), or why not
    found: list[Resolution] = []
    for item in budget.outstanding():
        network = item.authorization.network
        chain = by_network.get(network)
        if chain is None:
            found.append(Resolution(item, "unreadable", detail=f"no chain given for {network}"))
            continue
        try:
            if network not in latest:
                latest[network] = await chain.latest_block()
            block = latest[network]
            if isinstance(block, str):
                found.append(Resolution(item, "unreadable", detail=block))
                continue
            found.append(await _resolve(budget, item, chain, block, grace, now))
        except FareboxError as exc:
            detail = f"{network}: {exc}"[:300]
            latest.setdefault(network, detail)
            found.append(Resolution(item, "unreadable", detail=detail))
    return Reconciliation(tuple(found))


def reconcile_sync(
    budget: Budget,
    chains: Iterable[AuthorizationChain | str],
    *,
    grace: int = RELEASE_GRACE,
    now: int | None = None,
) -> Reconciliation:
    """:func:`reconcile` for synchronous code (runs its own event loop): for example
    ``reconcile_sync(agent.budget, ["https://sepolia.base.org"])`` when the agent starts."""
    given = list(chains)

    async def run() -> Reconciliation:
        return await reconcile(budget, given, grace=grace, now=now)

    return anyio.run(run)


def _check_url(url: str) -> None:
    """Refuse what httpx could not even try to reach, naming no part of the URL but its host:
    provider URLs carry API keys in the path or the user name."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port out of range
    except ValueError:
        raise ConfigError("an RPC URL is malformed (http:// or https://, a host, a port)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("an RPC URL is http:// or https:// and names a host")


async def open_chains(urls: Sequence[str], *, timeout: float = 10.0) -> list[EvmReader]:
    """A reader for each JSON-RPC URL, its network named by the node's ``eth_chainId``.

    The caller closes them (``await reader.aclose()``). Errors name the node's host only: a
    provider URL often carries an API key.
    """
    for url in urls:
        _check_url(url)
    readers: list[EvmReader] = []
    try:
        for url in urls:
            rpc = HttpRpc(url, timeout=timeout)
            reader = EvmReader(rpc, network="")
            readers.append(reader)
            try:
                chain_id = await rpc.request("eth_chainId", [])
                reader.network = f"eip155:{int(chain_id, 16)}"
            except (RpcError, RpcUnavailable, TypeError, ValueError) as exc:
                host = urlsplit(url).hostname or "the node"
                raise PaymentError(
                    "ledger_unavailable", f"{host} gave no chain id ({type(exc).__name__})"
                ) from None
    except BaseException:
        for reader in readers:
            await reader.aclose()
        raise
    return readers
