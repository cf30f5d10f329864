"""Is the asset a payment names an EIP-3009 token? Two chain reads, remembered per asset.

A payment's ``asset`` comes from the requirements the resource server sends, so a facilitator
must not take it on trust. An address without code answers every ``eth_call`` with empty
success, so the simulation of ``transferWithAuthorization`` "passes" and the settlement then
spends gas on a transaction that moves nothing. Before anything else, the asset must hold code
and answer ``authorizationState(address,bytes32)`` with one word (the call settlement's
bookkeeping and reconciliation rely on). Codes as the official facilitators give them:
``asset_not_deployed_contract`` for an address without code,
``invalid_exact_evm_eip3009_not_supported`` for a contract that does not answer the EIP-3009
read, ``invalid_exact_evm_failed_to_get_asset_info`` when the node's answer about the asset is
unusable; a node that cannot be reached is ``ledger_unavailable``, as for every other chain read.

Only positive answers are remembered (for ``ttl`` seconds, at most ``max_entries`` assets): a
refusal may be a token caught mid-deployment and must heal on the next request, and remembering
refusals would let anyone fill the memory with made-up addresses.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from farebox.errors import PaymentError
from farebox.eth import address_bytes, checksum_address
from farebox.ledgers.evm import AUTHORIZATION_STATE
from farebox.ledgers.rpc import Rpc, RpcError, RpcUnavailable

__all__ = ["DEFAULT_ASSET_TTL", "TokenCheck"]

#: How long a positive check is reused, as the official facilitators do (15 minutes).
DEFAULT_ASSET_TTL = 900.0
_MAX_ENTRIES = 4096
# authorizationState(address(1), bytes32(0)): any authorizer and nonce do; only the answer's shape
# matters. Address 1, not 0: a token may refuse the zero address outright.
_PROBE = AUTHORIZATION_STATE + (1).to_bytes(32, "big") + bytes(32)


class TokenCheck:
    """Checks that an asset is a contract answering EIP-3009's reads, for one network."""

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_ASSET_TTL,
        max_entries: int = _MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._good_until: dict[bytes, float] = {}

    async def check(self, rpc: Rpc, asset: str) -> None:
        """Return if ``asset`` is a deployed EIP-3009 token, asking ``rpc`` (a node of this
        check's network) unless it was found to be one lately; else raise with the x402 code."""
        try:
            raw = address_bytes(asset)
        except ValueError:
            raise PaymentError(
                "invalid_exact_evm_failed_to_get_asset_info", "the asset is not an address"
            ) from None
        now = self.clock()
        if self._good_until.get(raw, 0.0) > now:
            return
        address = checksum_address(raw)
        code = await _read(rpc, "eth_getCode", [address, "latest"])
        if code is None:
            raise PaymentError(
                "invalid_exact_evm_failed_to_get_asset_info",
                f"the node did not say what is deployed at {address}",
            )
        if len(code) <= 2:
            raise PaymentError(
                "asset_not_deployed_contract", f"no contract is deployed at asset {address}"
            )
        call = {"to": address, "data": "0x" + _PROBE.hex()}
        state = await _read(rpc, "eth_call", [call, "latest"])
        if state is None or len(state) != 66 or int(state, 16) > 1:
            raise PaymentError(
                "invalid_exact_evm_eip3009_not_supported",
                f"asset {address} does not answer EIP-3009's authorizationState",
            )
        self._remember(raw, now)

    def _remember(self, raw: bytes, now: float) -> None:
        if raw not in self._good_until and len(self._good_until) >= self.max_entries:
            expired = [key for key, until in self._good_until.items() if until <= now]
            for key in expired:
                del self._good_until[key]
            if len(self._good_until) >= self.max_entries:
                return  # full of live entries: check this one again next time
        self._good_until[raw] = now + self.ttl


async def _read(rpc: Rpc, method: str, params: list[object]) -> str | None:
    """The node's hex answer; ``None`` for an error answer or one that is not hex data."""
    try:
        answer = await rpc.request(method, params)
    except RpcUnavailable as exc:
        raise PaymentError("ledger_unavailable", str(exc)) from None
    except RpcError:
        # eth_getCode has no reason to fail; eth_call does when the contract reverts.
        return None
    if not isinstance(answer, str) or not answer.startswith("0x"):
        return None
    try:
        bytes.fromhex(answer[2:])
    except ValueError:
        return None
    return answer
