"""Settlement of ``exact`` EVM payments over JSON-RPC: any node, or the embedded chain in-process.

The settler account pays the gas and calls the token's EIP-3009 ``transferWithAuthorization`` with
the payer's signature. The call is simulated with ``eth_call`` twice: when the proof is verified
(:meth:`EvmLedger.simulate`, before the resource is served) and again right before the transaction is
signed, with the settler's nonce known, so a payment that stopped being payable in between (the
payer's balance went to another settlement, the authorization was used) is refused with its x402
code and no gas is spent on a revert. A transaction that was broadcast but not confirmed in time is
reported as ``settlement_pending`` with its hash: the money may still move, so it is neither success
nor failure.

Many processes may settle with one settler key. Each keeps its own nonce counter (no round trip
when nothing raced); a nonce another process took is resynchronised from the node's pending count
and retried, with jitter, for a bounded time, and is never reported as the payment's failure.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import anyio

from farebox.errors import PaymentError
from farebox.eth import EvmAccount, address_bytes, checksum_address, keccak256
from farebox.ledgers.rpc import Rpc, RpcError, RpcUnavailable
from farebox.protocol.models import Settlement, VerifiedProof
from farebox.schemes.evm_exact import VerifiedEvmProof, chain_id_of

logger = logging.getLogger("farebox.ledger")

__all__ = [
    "TRANSFER_TOPIC",
    "TRANSFER_WITH_AUTHORIZATION",
    "EvmLedger",
    "EvmReader",
    "code_for_revert",
    "encode_transfer_with_authorization",
    "revert_reason",
]

TRANSFER_WITH_AUTHORIZATION = bytes.fromhex("e3ee160e")
AUTHORIZATION_STATE = bytes.fromhex("e94a0102")  # authorizationState(address,bytes32)
AUTHORIZATION_USED_TOPIC = "0x" + keccak256(b"AuthorizationUsed(address,bytes32)").hex()
AUTHORIZATION_CANCELED_TOPIC = "0x" + keccak256(b"AuthorizationCanceled(address,bytes32)").hex()
TRANSFER_TOPIC = "0x" + keccak256(b"Transfer(address,address,uint256)").hex()
_ERROR_SELECTOR = bytes.fromhex("08c379a0")
# Bounding a log search by time: the block rate is measured over this many recent blocks, and
# this many blocks more are searched than the estimate says.
_RATE_SAMPLE_BLOCKS = 2_000
_LOG_MARGIN_BLOCKS = 100

# USDC's revert texts, in the order the official facilitator matches them.
_REVERT_CODES = (
    ("authorization is expired", "invalid_exact_evm_payload_authorization_valid_before"),
    ("authorization is not yet valid", "invalid_exact_evm_payload_authorization_valid_after"),
    ("authorization is used", "invalid_exact_evm_nonce_already_used"),
    ("transfer amount exceeds balance", "invalid_exact_evm_insufficient_balance"),
    ("invalid signature", "invalid_exact_evm_payload_signature"),
)


def encode_transfer_with_authorization(proof: VerifiedEvmProof) -> bytes:
    """Calldata of ``transferWithAuthorization(from,to,value,validAfter,validBefore,nonce,v,r,s)``."""
    auth = proof.authorization
    sig = proof.signature
    words = (
        auth.from_.rjust(32, b"\0"),
        auth.to.rjust(32, b"\0"),
        auth.value.to_bytes(32, "big"),
        auth.valid_after.to_bytes(32, "big"),
        auth.valid_before.to_bytes(32, "big"),
        auth.nonce,
        sig[64].to_bytes(32, "big"),
        sig[:32],
        sig[32:64],
    )
    return TRANSFER_WITH_AUTHORIZATION + b"".join(words)


def revert_reason(error: RpcError) -> str | None:
    """The ``Error(string)`` text of a revert, from the error's data or else its message."""
    data = error.data
    if isinstance(data, dict):  # some nodes nest it: {"data": {"data": "0x..."}}
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            raw = bytes.fromhex(data[2:])
        except ValueError:
            raw = b""
        if raw[:4] == _ERROR_SELECTOR and len(raw) >= 68:
            length = int.from_bytes(raw[36:68], "big")
            if length <= len(raw) - 68:
                return raw[68 : 68 + length].decode("utf-8", "replace")
    if "revert" in error.message.lower():
        return error.message
    return None


def code_for_revert(text: str) -> str:
    """The x402 reason code for a token's revert text (``transaction_failed`` when unknown)."""
    lowered = text.lower()
    for needle, code in _REVERT_CODES:
        if needle in lowered:
            return code
    return "transaction_failed"


def _rlp(item: bytes | int | Sequence[Any]) -> bytes:
    # Recursive-length prefix, enough for a transaction: ints, byte strings and lists of them.
    if isinstance(item, int):
        item = item.to_bytes((item.bit_length() + 7) // 8, "big") if item else b""
    if isinstance(item, bytes):
        if len(item) == 1 and item[0] < 0x80:
            return item
        return _rlp_length(len(item), 0x80) + item
    payload = b"".join(_rlp(x) for x in item)
    return _rlp_length(len(payload), 0xC0) + payload


def _rlp_length(length: int, offset: int) -> bytes:
    if length < 56:
        return bytes([offset + length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([offset + 55 + len(encoded)]) + encoded


# How nodes refuse a transaction whose nonce is no longer (or not yet) the account's next one,
# letters only: geth, erigon, anvil and the embedded chain say "nonce too low"/"nonce too high",
# geth "replacement transaction underpriced" when another transaction with that nonce waits in its
# pool, Nethermind "OldNonce", Besu "NONCE_TOO_LOW" and "REPLACEMENT_UNDERPRICED". Any of them
# means another process settling with the same account took the nonce (or ours is stale).
_NONCE_RACE = (
    "noncetoolow",
    "noncetoohigh",
    "invalidnonce",
    "oldnonce",
    "replacementtransactionunderpriced",
    "replacementunderpriced",
)
# geth "already known", Nethermind "AlreadyKnown", "known transaction": this very signed
# transaction is in the node's pool already (a load-balanced endpoint forwarded it, then answered
# from another backend). It was sent: never a race, never "nothing was sent".
_ALREADY_KNOWN = ("alreadyknown", "knowntransaction")
# Losing a nonce race is retried this often at most (one lap of the other processes each time),
# and for no longer than EvmLedger's ``nonce_wait``; after that the settler is busy, not the
# payment failed.
_NONCE_ATTEMPTS = 64
# The pause before a retry: drawn at random (so that processes that collide fall out of step) up to
# a bound that doubles with each attempt, to about one settlement's time. A process that keeps
# losing is usually behind another one with a queue of settlements, whose local counter beats a
# fresh read of the nonce every time until its queue drains; retrying it at full speed would only
# load the node with simulations.
_JITTER_FIRST = 0.004
_JITTER_CAP = 0.1


def _letters(error: RpcError) -> str:
    return "".join(c for c in error.message.lower() if "a" <= c <= "z")


def _is_nonce_race(error: RpcError) -> bool:
    letters = _letters(error)
    return any(text in letters for text in _NONCE_RACE)


def _is_already_known(error: RpcError) -> bool:
    letters = _letters(error)
    return any(text in letters for text in _ALREADY_KNOWN)


class _MaybeSent(Exception):
    """The broadcast's answer was lost: the signed transaction may be on its way."""

    def __init__(self, transaction: str) -> None:
        super().__init__(transaction)
        self.transaction = transaction


def _quantity(value: Any, what: str) -> int:
    if isinstance(value, str) and value.startswith("0x"):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise RpcUnavailable(f"the node returned a malformed {what}")


class EvmReader:
    """Reads what one EVM network's chain says about authorizations and transactions, through a
    JSON-RPC endpoint; holds no key and never sends (a server settling through a facilitator
    reconciles with one)."""

    def __init__(self, rpc: Rpc, *, network: str) -> None:
        self.rpc = rpc
        self.network = network

    async def aclose(self) -> None:
        """Close the connection to the node, if the RPC holds one."""
        close = getattr(self.rpc, "aclose", None)
        if close is not None:
            await close()

    # --- what the chain says about an authorization (for reconciliation) -----------------------

    async def latest_block(self) -> tuple[int, int]:
        """The latest block's number and timestamp: an authorization whose ``validBefore`` the
        timestamp has passed can be used in no later block."""
        return await self._block("latest")

    async def _block(self, tag: str) -> tuple[int, int]:
        try:
            block = await self.rpc.request("eth_getBlockByNumber", [tag, False])
        except (RpcError, RpcUnavailable) as exc:
            raise PaymentError("ledger_unavailable", f"block {tag} failed: {exc}") from None
        if not isinstance(block, dict):
            raise PaymentError("ledger_unavailable", f"the node returned no block {tag}")
        return _quantity(block.get("number"), "block number"), _quantity(
            block.get("timestamp"), "block timestamp"
        )

    async def authorization_used(
        self, token: str, authorizer: bytes, nonce: bytes, *, block: int | None = None
    ) -> bool:
        """Whether the token has consumed (or canceled) ``authorizer``'s ``nonce``, at ``block``
        (a number; default the latest)."""
        data = AUTHORIZATION_STATE + authorizer.rjust(32, b"\0") + nonce
        at = "latest" if block is None else hex(block)
        try:
            answer = await self.rpc.request(
                "eth_call", [{"to": checksum_address(token), "data": "0x" + data.hex()}, at]
            )
        except (RpcError, RpcUnavailable) as exc:
            raise PaymentError("ledger_unavailable", f"authorizationState failed: {exc}") from None
        return _quantity(answer, "authorization state") != 0

    async def authorization_transaction(
        self, token: str, authorizer: bytes, nonce: bytes, *, since: int | None = None
    ) -> str | None:
        """The transaction in which the token logged ``AuthorizationUsed(authorizer, nonce)``;
        ``since`` (unix seconds) bounds the search to blocks from about then."""
        return await self._authorization_log(
            AUTHORIZATION_USED_TOPIC, token, authorizer, nonce, since
        )

    async def authorization_cancellation(
        self, token: str, authorizer: bytes, nonce: bytes, *, since: int | None = None
    ) -> str | None:
        """The transaction in which the token logged ``AuthorizationCanceled(authorizer, nonce)``:
        the payer cancelled it, and it can never move money."""
        return await self._authorization_log(
            AUTHORIZATION_CANCELED_TOPIC, token, authorizer, nonce, since
        )

    async def _from_block(self, since: int | None) -> str:
        """A block number at or before the time ``since``, estimated from the recent block rate
        with a wide margin (nodes refuse or cap ``eth_getLogs`` from the first block). An
        estimate too late would only miss a log, which callers read as not knowing."""
        if since is None:
            return "earliest"
        number, stamp = await self.latest_block()
        if stamp <= since:
            return hex(max(0, number - _LOG_MARGIN_BLOCKS))
        sample = max(0, number - _RATE_SAMPLE_BLOCKS)
        if sample == number:
            return "earliest"
        _, sample_stamp = await self._block(hex(sample))
        if sample_stamp >= stamp:
            return "earliest"  # many blocks in one second (a development chain): no rate to use
        seconds_per_block = (stamp - sample_stamp) / (number - sample)
        back = int((stamp - since) / seconds_per_block * 1.5) + _LOG_MARGIN_BLOCKS
        return hex(max(0, number - back))

    async def _authorization_log(
        self, topic: str, token: str, authorizer: bytes, nonce: bytes, since: int | None = None
    ) -> str | None:
        query = {
            "address": checksum_address(token),
            "fromBlock": await self._from_block(since),
            "toBlock": "latest",
            "topics": [topic, "0x" + authorizer.rjust(32, b"\0").hex(), "0x" + nonce.hex()],
        }
        try:
            logs = await self.rpc.request("eth_getLogs", [query])
        except (RpcError, RpcUnavailable) as exc:
            raise PaymentError("ledger_unavailable", f"eth_getLogs failed: {exc}") from None
        if isinstance(logs, list):
            for log in logs:
                if isinstance(log, dict) and isinstance(log.get("transactionHash"), str):
                    return str(log["transactionHash"])
        return None

    async def transferred(
        self, tx_hash: str, token: str, sender: bytes, recipient: bytes, value: int
    ) -> bool:
        """Whether the mined transaction ``tx_hash`` moved ``value`` of ``token`` from ``sender``
        to ``recipient``: the authorization that used a nonce is not always the one a server
        holds (a payer may sign two with one nonce), and only a matching transfer paid it."""
        try:
            receipt = await self.rpc.request("eth_getTransactionReceipt", [tx_hash])
        except (RpcError, RpcUnavailable) as exc:
            raise PaymentError("ledger_unavailable", f"transaction lookup failed: {exc}") from None
        return (
            isinstance(receipt, dict)
            and receipt.get("status") == "0x1"
            and _has_transfer(receipt, token, sender, recipient, value)
        )

    async def transaction_status(self, tx_hash: str) -> str:
        """``"success"``, ``"reverted"``, ``"pending"`` (known, not mined) or ``"unknown"``."""
        try:
            receipt = await self.rpc.request("eth_getTransactionReceipt", [tx_hash])
            if isinstance(receipt, dict):
                return "success" if receipt.get("status") == "0x1" else "reverted"
            known = await self.rpc.request("eth_getTransactionByHash", [tx_hash])
        except (RpcError, RpcUnavailable) as exc:
            raise PaymentError("ledger_unavailable", f"transaction lookup failed: {exc}") from None
        return "pending" if isinstance(known, dict) else "unknown"


class EvmLedger(EvmReader):
    """Settles verified ``exact`` proofs on one EVM network through a JSON-RPC endpoint.

    ``settler`` signs and pays for the transactions; its nonce is tracked locally so concurrent
    settlements do not collide, and resynchronised from the node after a refused send. Other
    processes may settle with the same key: a nonce one of them took is retried for up to
    ``nonce_wait`` seconds, then the settlement is refused as ``ledger_unavailable`` with nothing
    broadcast.
    """

    def __init__(
        self,
        rpc: Rpc,
        settler: EvmAccount,
        *,
        network: str,
        gas_limit: int = 200_000,
        confirm_timeout: float = 15.0,
        poll_interval: float = 0.05,
        fee_ttl: float = 15.0,
        nonce_wait: float = 10.0,
    ) -> None:
        super().__init__(rpc, network=network)
        self.settler = settler
        self.chain_id = chain_id_of(network)
        self.gas_limit = gas_limit
        self.confirm_timeout = confirm_timeout
        self.poll_interval = poll_interval
        self._fee_ttl = fee_ttl
        self._fees: tuple[float, int, int] | None = None  # (fetched at, max fee, priority fee)
        self.nonce_wait = nonce_wait
        self._nonce: int | None = None
        self._send_lock = anyio.Lock()
        # Simulations read the pending block (it holds transactions sent but not yet mined, on a
        # chain with block times); a node without one is asked about the latest block instead.
        self._call_block = "pending"

    # --- checking before the resource is served -------------------------------------------------

    async def simulate(self, proof: VerifiedProof) -> None:
        """Dry-run the transfer with ``eth_call``; raise with the x402 code if it would revert."""
        evm = _as_evm(proof)
        await self._simulate(evm, encode_transfer_with_authorization(evm))

    async def _simulate(self, evm: VerifiedEvmProof, data: bytes) -> None:
        call = {
            "from": self.settler.address,
            "to": checksum_address(evm.offer.asset),
            "data": "0x" + data.hex(),
            "gas": hex(self.gas_limit),
        }
        try:
            await self._call(call)
        except RpcError as exc:
            reason = revert_reason(exc)
            if reason is None:
                raise PaymentError(
                    "ledger_unavailable", f"the node refused the simulation ({exc.code})"
                ) from None
            code = code_for_revert(reason)
            if code == "transaction_failed":
                code = "invalid_exact_evm_transaction_simulation_failed"
            raise PaymentError(
                code, f"simulation reverted: {reason[:200]}", payer=evm.payer
            ) from None
        except RpcUnavailable as exc:
            raise PaymentError("ledger_unavailable", str(exc)) from None

    # --- settling ------------------------------------------------------------------------------

    async def settle(self, proof: VerifiedProof) -> Settlement:
        """Send the transfer and wait for it; a :class:`Settlement` for every outcome.

        Raises :class:`~farebox.errors.PaymentError` only when nothing was broadcast: the transfer
        would revert now (the simulation's x402 code, e.g. ``invalid_exact_evm_insufficient_balance``),
        the ledger could not be reached, or other processes kept taking the settler's nonce
        (``ledger_unavailable``). Then no money can have moved and the caller may release its claim.
        """
        evm = _as_evm(proof)
        data = encode_transfer_with_authorization(evm)
        try:
            tx_hash = await self._send(evm, data)
        except _MaybeSent as lost:
            return Settlement(
                success=False,
                network=self.network,
                transaction=lost.transaction,
                payer=evm.payer,
                error_reason="settlement_pending",
                error_message="the node's answer to the broadcast was lost",
                amount=evm.authorization.value,
            )
        except RpcError as exc:
            reason = revert_reason(exc)
            return Settlement(
                success=False,
                network=self.network,
                payer=evm.payer,
                error_reason=code_for_revert(reason) if reason else "transaction_failed",
                error_message=(reason or exc.message)[:200],
                amount=evm.authorization.value,
            )
        except RpcUnavailable as exc:
            raise PaymentError("ledger_unavailable", str(exc)) from None
        return await self._confirm(evm, tx_hash)

    async def _send(self, evm: VerifiedEvmProof, data: bytes) -> str:
        to = checksum_address(evm.offer.asset)
        async with self._send_lock:
            deadline = time.monotonic() + self.nonce_wait
            signed: list[str] = []  # every transaction this settlement signed, in order
            for attempt in range(1, _NONCE_ATTEMPTS + 1):
                if self._nonce is None:
                    self._nonce = _quantity(
                        await self.rpc.request(
                            "eth_getTransactionCount", [self.settler.address, "pending"]
                        ),
                        "nonce",
                    )
                # Checked again now that the nonce is known: the proof was simulated when it was
                # verified, but another settlement may have spent the payer's balance or used the
                # authorization since (this process's, sent under this lock a moment ago, or
                # another process's). A refusal here is a PaymentError: nothing is broadcast.
                #
                # Across processes the settler's nonce orders the transactions: one with a lower
                # nonce is in the state simulated (on automining chains such as the embedded one
                # and anvil a sent transaction is mined at once; on a chain with block times the
                # "pending" block holds it, where the node builds one), and one that takes this
                # nonce first makes the send below fail as a race, so the retry simulates again.
                # What no settler can see coming is a transfer by the payer or by another key
                # landing between this check and the transaction, nor, on a node without a
                # pending block, a transaction still in the pool: those revert, rarely. There too,
                # a counter behind the pool can replace another process's waiting transaction when
                # our fee is enough higher, instead of failing as a race: that payment then ends
                # pending and the reconciler releases it (a shared lock per key would close it).
                try:
                    await self._simulate(evm, data)
                except PaymentError:
                    # On a retry, "already used" may be our own earlier attempt, taken after all.
                    sent = await self._known(signed) if signed else None
                    if sent is None:
                        raise
                    self._nonce = None
                    tx_hash = sent
                    break
                max_fee, priority = await self._fees_now()
                raw = self._sign_1559(self._nonce, max_fee, priority, to, data)
                # Known before sending: if the answer is lost, the transaction can still be found.
                signed_hash = "0x" + keccak256(raw).hex()
                signed.append(signed_hash)
                try:
                    tx_hash = await self.rpc.request("eth_sendRawTransaction", ["0x" + raw.hex()])
                except RpcError as exc:
                    if revert_reason(exc) is not None:
                        self._nonce += 1  # the node mined it and it reverted: the nonce is used
                        raise
                    # Refused before execution: the node is the truth, ask it again.
                    self._nonce = None
                    if _is_already_known(exc):
                        tx_hash = signed_hash  # it is in the pool: sent
                        break
                    if not _is_nonce_race(exc):
                        raise
                    # A refusal from one backend of a load-balanced endpoint does not prove that
                    # another did not take an earlier attempt: signing again must not send twice.
                    sent = await self._known(signed)
                    if sent is not None:
                        tx_hash = sent
                        break
                    if attempt == _NONCE_ATTEMPTS or time.monotonic() >= deadline:
                        raise PaymentError(
                            "ledger_unavailable",
                            f"other processes settling with this settler key took its nonce "
                            f"{attempt} times in a row; nothing was sent",
                        ) from None
                    pause = min(_JITTER_CAP, _JITTER_FIRST * 2 ** (attempt - 1))
                    await anyio.sleep(random.uniform(0, pause))
                    continue
                except RpcUnavailable as exc:
                    # It may have reached the node: resynchronise rather than guess, and report
                    # the hash so that the payment is treated as pending, never as not sent.
                    self._nonce = None
                    raise _MaybeSent(signed_hash) from exc
                self._nonce += 1
                break
        if not isinstance(tx_hash, str) or len(tx_hash) != 66:
            raise _MaybeSent(signed_hash)
        return tx_hash

    async def _known(self, hashes: list[str]) -> str | None:
        """The first of ``hashes`` the node knows (pooled or mined), else ``None``; a node that
        cannot say leaves the payment pending (it may have been sent)."""
        for tx_hash in hashes:
            try:
                found = await self.rpc.request("eth_getTransactionByHash", [tx_hash])
            except (RpcError, RpcUnavailable) as exc:
                raise _MaybeSent(hashes[-1]) from exc
            if isinstance(found, dict):
                return tx_hash
        return None

    async def _call(self, call: dict[str, str]) -> None:
        """``eth_call`` at the pending block, or at the latest one on a node without pending."""
        block = self._call_block
        try:
            await self.rpc.request("eth_call", [call, block])
            return
        except RpcError as exc:
            if block == "latest" or revert_reason(exc) is not None:
                raise
            failed = exc
        # No answer about the pending block. This call asks about the latest one instead; only a
        # node that says it has no pending block is asked about "latest" from now on (a rate limit
        # or a load balancer's passing error must not turn off the check of pooled transactions).
        unsupported = "pending" in failed.message.lower()
        try:
            await self.rpc.request("eth_call", [call, "latest"])
        except RpcError as latest:
            if unsupported and revert_reason(latest) is not None:
                self._call_block = "latest"
            raise
        if unsupported:
            self._call_block = "latest"
        else:
            logger.warning(
                "eth_call at the pending block failed (%s); asked at latest", failed.code
            )

    async def _fees_now(self) -> tuple[int, int]:
        now = time.monotonic()
        if self._fees is None or now - self._fees[0] > self._fee_ttl:
            gas_price = _quantity(await self.rpc.request("eth_gasPrice", []), "gas price")
            try:
                priority = _quantity(
                    await self.rpc.request("eth_maxPriorityFeePerGas", []), "priority fee"
                )
            except RpcError:
                priority = min(gas_price, 10**9)
            # Twice the current price rides out a few blocks of rising base fee.
            max_fee = max(2 * gas_price, priority)
            self._fees = (now, max_fee, priority)
        return self._fees[1], self._fees[2]

    def _sign_1559(self, nonce: int, max_fee: int, priority: int, to: str, data: bytes) -> bytes:
        fields: list[Any] = [
            self.chain_id,
            nonce,
            priority,
            max_fee,
            self.gas_limit,
            address_bytes(to),
            0,
            data,
            [],
        ]
        digest = keccak256(b"\x02" + _rlp(fields))
        signature = self.settler.sign_digest(digest)
        y_parity = signature[64] - 27
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:64], "big")
        return b"\x02" + _rlp([*fields, y_parity, r, s])

    async def _confirm(self, evm: VerifiedEvmProof, tx_hash: str) -> Settlement:
        amount = evm.authorization.value

        def outcome(error: str | None = None, message: str | None = None) -> Settlement:
            return Settlement(
                success=error is None,
                network=self.network,
                transaction=tx_hash,
                payer=evm.payer,
                error_reason=error,
                error_message=message,
                amount=amount,
            )

        receipt: Any = None
        with anyio.move_on_after(self.confirm_timeout):
            while True:
                try:
                    receipt = await self.rpc.request("eth_getTransactionReceipt", [tx_hash])
                except (RpcError, RpcUnavailable):
                    receipt = None  # a flaky node mid-poll is not a failed payment
                if isinstance(receipt, dict):
                    break
                await anyio.sleep(self.poll_interval)
        if not isinstance(receipt, dict):
            return outcome("settlement_pending", "broadcast, not confirmed in time")
        if receipt.get("status") != "0x1":
            # A node mines a reverting transaction; replaying the call names the reason.
            try:
                await self.simulate(evm)
            except PaymentError as exc:
                if exc.code != "ledger_unavailable":
                    code = exc.code
                    if code == "invalid_exact_evm_transaction_simulation_failed":
                        code = "transaction_failed"
                    return outcome(code, f"the transaction reverted: {exc.message}")
            return outcome("transaction_failed", "the transaction reverted")
        auth = evm.authorization
        if not _has_transfer(receipt, evm.offer.asset, auth.from_, auth.to, auth.value):
            return outcome(
                "invalid_exact_evm_transfer_event_mismatch",
                "no Transfer log matching the authorization",
            )
        return outcome()


def _as_evm(proof: VerifiedProof) -> VerifiedEvmProof:
    if not isinstance(proof, VerifiedEvmProof):
        raise PaymentError("unsupported_scheme", "this ledger settles only exact EVM proofs")
    return proof


def _has_transfer(
    receipt: dict[str, Any], token: str, sender: bytes, recipient: bytes, value: int
) -> bool:
    """Whether ``receipt`` logs the token's ``Transfer(sender, recipient, value)``."""
    token = token.lower()
    want = [
        TRANSFER_TOPIC,
        "0x" + sender.rjust(32, b"\0").hex(),
        "0x" + recipient.rjust(32, b"\0").hex(),
    ]
    logs = receipt.get("logs")
    if not isinstance(logs, list):
        return False
    for log in logs:
        if not isinstance(log, dict) or str(log.get("address", "")).lower() != token:
            continue
        topics = log.get("topics")
        if not isinstance(topics, list) or [str(t).lower() for t in topics] != want:
            continue
        data = log.get("data")
        if isinstance(data, str) and data.startswith("0x"):
            try:
                if int(data, 16) == value:
                    return True
            except ValueError:
                continue
    return False
