"""Settlement on the embedded chain: success, each revert's code, pending, and an unreachable node."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from farebox.dev.devchain import DevChain
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.ledgers.evm import EvmLedger
from farebox.ledgers.rpc import HttpRpc, RpcError, RpcUnavailable
from farebox.protocol.models import Offer, Settlement
from farebox.schemes.evm_exact import VerifiedEvmProof, make_proof, verify
from tests.support.chain import fund, offer_on
from tests.support.faults import HiddenReceipts

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def verified(
    chain: DevChain, payer: EvmAccount, offer: Offer, now: int | None = None
) -> VerifiedEvmProof:
    now = int(time.time()) if now is None else now
    proof = make_proof(payer, offer, now=now, nonce=os.urandom(32))
    return verify(proof, offer, now=now)


def settler_nonce(chain: DevChain, ledger: EvmLedger) -> int:
    """How many transactions the ledger's settler has sent (and the chain mined)."""
    return int(chain.handle("eth_getTransactionCount", [ledger.settler.address, "latest"]), 16)


def reverted_by(chain: DevChain, settler: str, since_block: int) -> int:
    """How many of ``settler``'s transactions mined after ``since_block`` have status 0."""
    count = 0
    for number in range(since_block + 1, chain.block_number() + 1):
        block = chain.handle("eth_getBlockByNumber", [hex(number), True])
        for tx in block["transactions"]:
            if tx["from"].lower() == settler.lower():
                receipt = chain.handle("eth_getTransactionReceipt", [tx["hash"]])
                count += receipt["status"] == "0x0"
    return count


async def test_settles_and_checks_the_transfer_log(chain: DevChain) -> None:
    payer, merchant = fund(chain), EvmAccount.generate().address
    ledger = EvmLedger(chain.rpc, chain.accounts[1].account, network=chain.network)
    proof = verified(chain, payer, offer_on(chain, merchant))
    await ledger.simulate(proof)
    settlement = await ledger.settle(proof)
    assert settlement.success
    assert settlement.payer == payer.address
    assert settlement.amount == 10_000
    assert chain.balance_of(merchant) == 10_000
    receipt = chain.handle("eth_getTransactionReceipt", [settlement.transaction])
    assert receipt["status"] == "0x1"
    # The same authorization again: the token says it is used, and that is the code.
    with pytest.raises(PaymentError) as used:
        await ledger.simulate(proof)
    assert used.value.code == "invalid_exact_evm_nonce_already_used"
    # Settled again anyway: refused before anything is signed, so no gas goes on a revert.
    sent = settler_nonce(chain, ledger)
    with pytest.raises(PaymentError) as again:
        await ledger.settle(proof)
    assert again.value.code == "invalid_exact_evm_nonce_already_used"
    assert settler_nonce(chain, ledger) == sent
    assert chain.balance_of(merchant) == 10_000


async def test_simulation_maps_each_revert(chain: DevChain) -> None:
    ledger = EvmLedger(chain.rpc, chain.accounts[1].account, network=chain.network)
    merchant = EvmAccount.generate().address
    poor = EvmAccount.generate()
    with pytest.raises(PaymentError) as broke:
        await ledger.simulate(verified(chain, poor, offer_on(chain, merchant)))
    assert broke.value.code == "invalid_exact_evm_insufficient_balance"
    # The offline checks pass at the (old) time the server verified; the chain judges by its own.
    old = int(time.time()) - 2000
    expired = verified(chain, fund(chain), offer_on(chain, merchant), now=old)
    with pytest.raises(PaymentError) as too_late:
        await ledger.simulate(expired)
    assert too_late.value.code == "invalid_exact_evm_payload_authorization_valid_before"
    # A signature by someone else than `from`: the token's own check.
    forged = verified(chain, fund(chain), offer_on(chain, merchant))
    other = verified(chain, fund(chain), offer_on(chain, merchant))
    object.__setattr__(forged, "signature", other.signature)
    with pytest.raises(PaymentError) as bad_sig:
        await ledger.simulate(forged)
    assert bad_sig.value.code == "invalid_exact_evm_payload_signature"


async def test_unconfirmed_broadcast_is_pending_with_its_hash(chain: DevChain) -> None:
    payer, merchant = fund(chain), EvmAccount.generate().address
    ledger = EvmLedger(
        HiddenReceipts(chain),
        chain.accounts[2].account,
        network=chain.network,
        confirm_timeout=0.2,
        poll_interval=0.05,
    )
    settlement = await ledger.settle(verified(chain, payer, offer_on(chain, merchant)))
    assert settlement.pending
    assert not settlement.success
    assert settlement.transaction.startswith("0x")
    assert len(settlement.transaction) == 66
    # Pending is not failed: the chain did move the money.
    assert chain.handle("eth_getTransactionReceipt", [settlement.transaction])["status"] == "0x1"
    assert chain.balance_of(merchant) == 10_000


async def test_unreachable_node_is_ledger_unavailable(chain: DevChain) -> None:
    payer = fund(chain)
    ledger = EvmLedger(
        HttpRpc("http://127.0.0.1:9", timeout=2), chain.accounts[3].account, network=chain.network
    )
    proof = verified(chain, payer, offer_on(chain, EvmAccount.generate().address))
    for step in (ledger.simulate, ledger.settle):
        with pytest.raises(PaymentError) as down:
            await step(proof)
        assert down.value.code == "ledger_unavailable"
        assert down.value.status == 503
        assert "127.0.0.1" not in down.value.message  # the node's URL may hold an API key
    await ledger.aclose()


class LostAnswers:
    """The node receives every broadcast, but its answer never comes back."""

    def __init__(self, chain: DevChain) -> None:
        self.inner = chain.rpc

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        answer = await self.inner.request(method, params)
        if method == "eth_sendRawTransaction":
            raise RpcUnavailable("eth_sendRawTransaction: ReadTimeout talking to the node")
        return answer


async def test_a_lost_broadcast_answer_is_pending_with_the_right_hash(chain: DevChain) -> None:
    payer, merchant = fund(chain), EvmAccount.generate().address
    ledger = EvmLedger(LostAnswers(chain), chain.accounts[4].account, network=chain.network)
    settlement = await ledger.settle(verified(chain, payer, offer_on(chain, merchant)))
    # Not "failed", not "not sent": the money may move (and here it did), so it is pending.
    assert settlement.pending
    receipt = chain.handle("eth_getTransactionReceipt", [settlement.transaction])
    assert receipt["status"] == "0x1"
    assert chain.balance_of(merchant) == 10_000


async def test_two_processes_settling_with_one_account_both_land(chain: DevChain) -> None:
    # Two ledgers with their own nonce counters stand for two server processes sharing a key.
    account = chain.accounts[6].account
    first = EvmLedger(chain.rpc, account, network=chain.network)
    second = EvmLedger(chain.rpc, account, network=chain.network)
    merchant = EvmAccount.generate().address
    proofs = [verified(chain, fund(chain), offer_on(chain, merchant)) for _ in range(4)]
    assert (await first.settle(proofs[0])).success
    assert (await second.settle(proofs[1])).success  # its nonce was taken: resynchronised
    assert (await first.settle(proofs[2])).success
    assert (await second.settle(proofs[3])).success
    assert chain.balance_of(merchant) == 40_000


async def test_many_ledgers_on_one_key_settle_every_payment_concurrently(chain: DevChain) -> None:
    # Three ledgers with their own nonce counters stand for three processes sharing a settler
    # key, each settling ten payments at once: every one lands, none is refused for a nonce.
    account = chain.accounts[5].account
    ledgers = [EvmLedger(chain.rpc, account, network=chain.network) for _ in range(3)]
    merchant, payer = EvmAccount.generate().address, fund(chain)
    start, sent = chain.block_number(), settler_nonce(chain, ledgers[0])
    outcomes: list[Settlement | PaymentError] = []

    async def one(ledger: EvmLedger, proof: VerifiedEvmProof) -> None:
        try:
            outcomes.append(await ledger.settle(proof))
        except PaymentError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            for ledger in ledgers:
                tg.start_soon(one, ledger, verified(chain, payer, offer_on(chain, merchant)))
    failed = [o for o in outcomes if not isinstance(o, Settlement) or not o.success]
    assert failed == []
    assert len(outcomes) == 30
    assert chain.balance_of(merchant) == 300_000
    assert settler_nonce(chain, ledgers[0]) - sent == 30
    assert reverted_by(chain, account.address, start) == 0


async def test_a_payer_holding_one_payment_is_settled_once_and_nothing_reverts(
    chain: DevChain,
) -> None:
    # Twenty payments that each pass the simulation at verify time, settled at once by three
    # ledgers on one key: the balance pays one, the other nineteen are refused before broadcast.
    account = chain.accounts[5].account
    ledgers = [EvmLedger(chain.rpc, account, network=chain.network) for _ in range(3)]
    merchant, payer = EvmAccount.generate().address, fund(chain, 10_000)
    proofs = [verified(chain, payer, offer_on(chain, merchant)) for _ in range(20)]
    for proof in proofs:
        await ledgers[0].simulate(proof)
    start, sent = chain.block_number(), settler_nonce(chain, ledgers[0])
    settled: list[Settlement] = []
    refused: list[str] = []

    async def one(ledger: EvmLedger, proof: VerifiedEvmProof) -> None:
        try:
            settled.append(await ledger.settle(proof))
        except PaymentError as exc:
            refused.append(exc.code)

    async with anyio.create_task_group() as tg:
        for index, proof in enumerate(proofs):
            tg.start_soon(one, ledgers[index % 3], proof)
    assert [s.success for s in settled] == [True]
    assert refused == ["invalid_exact_evm_insufficient_balance"] * 19
    assert reverted_by(chain, account.address, start) == 0
    assert settler_nonce(chain, ledgers[0]) - sent == 1  # gas paid for the one transfer only
    assert chain.balance_of(merchant) == 10_000


class RivalSettler:
    """Another process settling with the same account: before each of our next ``takes``
    broadcasts, one of its transactions lands first and uses the nonce ours was signed with."""

    def __init__(self, chain: DevChain, settler: str, takes: int) -> None:
        self.inner = chain.rpc
        self.chain = chain
        self.settler = settler
        self.takes = takes
        self.sends = 0

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        if method == "eth_sendRawTransaction":
            self.sends += 1
            if self.takes > 0:
                self.takes -= 1
                rival = {"from": self.settler, "to": self.settler, "value": "0x0"}
                self.chain.handle("eth_sendTransaction", [rival])
        return await self.inner.request(method, params)


async def test_a_nonce_taken_again_and_again_is_retried_not_failed(chain: DevChain) -> None:
    account = chain.accounts[7].account
    rival = RivalSettler(chain, account.address, takes=6)
    ledger = EvmLedger(rival, account, network=chain.network)
    merchant = EvmAccount.generate().address
    settlement = await ledger.settle(verified(chain, fund(chain), offer_on(chain, merchant)))
    assert settlement.success, settlement
    assert rival.sends == 7
    assert chain.balance_of(merchant) == 10_000


async def test_a_settler_whose_nonce_is_always_taken_is_busy_and_sends_nothing(
    chain: DevChain,
) -> None:
    account = chain.accounts[7].account
    rival = RivalSettler(chain, account.address, takes=10**6)
    busy = EvmLedger(rival, account, network=chain.network, nonce_wait=0.3)
    merchant = EvmAccount.generate().address
    proof = verified(chain, fund(chain), offer_on(chain, merchant))
    with pytest.raises(PaymentError) as refused:
        await busy.settle(proof)
    # Not the payment's failure: the settler was busy, nothing of ours was broadcast, the proof
    # stays good and settles once the other process lets go.
    assert refused.value.code == "ledger_unavailable"
    assert rival.sends > 1
    assert chain.balance_of(merchant) == 0
    assert (await EvmLedger(chain.rpc, account, network=chain.network).settle(proof)).success
    assert chain.balance_of(merchant) == 10_000


class Recorded:
    """The chain, with every call's method and block reference written down."""

    def __init__(self, chain: DevChain, *, pending: bool = True) -> None:
        self.inner = chain.rpc
        self.pending = pending
        self.calls: list[tuple[str, Any]] = []

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        self.calls.append((method, params[1] if method == "eth_call" else None))
        if method == "eth_call" and params[1] == "pending" and not self.pending:
            raise RpcError(-32000, "pending block is not available")  # some nodes have none
        return await self.inner.request(method, params)

    def count(self, method: str, block: str | None = None) -> int:
        return self.calls.count((method, block))


async def test_settling_checks_the_pending_block_and_reads_the_nonce_once(chain: DevChain) -> None:
    node = Recorded(chain)
    ledger = EvmLedger(node, chain.accounts[8].account, network=chain.network)
    merchant, payer = EvmAccount.generate().address, fund(chain)
    for _ in range(3):
        assert (await ledger.settle(verified(chain, payer, offer_on(chain, merchant)))).success
    # One simulation right before each broadcast, at the block that holds what is not mined
    # yet; the nonce comes from the node once, then from the local counter while nothing races.
    assert node.count("eth_call", "pending") == 3
    assert node.count("eth_call", "latest") == 0
    assert node.count("eth_getTransactionCount") == 1
    assert node.count("eth_sendRawTransaction") == 3


async def test_a_node_without_a_pending_block_is_asked_about_the_latest(chain: DevChain) -> None:
    node = Recorded(chain, pending=False)
    ledger = EvmLedger(node, chain.accounts[8].account, network=chain.network)
    merchant = EvmAccount.generate().address
    with pytest.raises(PaymentError) as broke:
        await ledger.simulate(verified(chain, EvmAccount.generate(), offer_on(chain, merchant)))
    assert broke.value.code == "invalid_exact_evm_insufficient_balance"
    assert (await ledger.settle(verified(chain, fund(chain), offer_on(chain, merchant)))).success
    assert node.count("eth_call", "pending") == 1  # asked once, then never again
    assert node.count("eth_call", "latest") == 2


class ForwardsThenRefuses:
    """A load-balanced endpoint: one backend takes the transaction, another answers the send
    with ``error`` (as if it were refused). Everything else is the real chain."""

    def __init__(self, chain: DevChain, error: str, *, times: int = 1) -> None:
        self.inner = chain.rpc
        self.error = error
        self.times = times
        self.sends = 0

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        if method == "eth_sendRawTransaction":
            self.sends += 1
            await self.inner.request(method, params)
            if self.sends <= self.times:
                raise RpcError(-32000, self.error)
        return await self.inner.request(method, params)


@pytest.mark.parametrize("error", ["already known", "AlreadyKnown", "nonce too low"])
async def test_a_send_refused_after_it_went_out_is_settled_not_released(
    chain: DevChain, error: str
) -> None:
    """The node took the transfer and answered with a refusal: the payment moved, so it must be
    a settlement (never "nothing was sent", which would let the gate refuse a paid request), and
    it is not signed and sent a second time."""
    node = ForwardsThenRefuses(chain, error)
    ledger = EvmLedger(node, chain.accounts[8].account, network=chain.network)
    merchant, payer = EvmAccount.generate().address, fund(chain)
    settlement = await ledger.settle(verified(chain, payer, offer_on(chain, merchant)))
    assert settlement.success
    assert node.sends == 1
    assert chain.balance_of(merchant) == 10_000
    # The next settlement finds the nonce the first one used.
    other = EvmAccount.generate().address
    assert (await ledger.settle(verified(chain, fund(chain), offer_on(chain, other)))).success
    assert chain.balance_of(other) == 10_000


class PendingBlips(Recorded):
    """A node whose pending-block calls fail once with a passing error (a rate limit)."""

    def __init__(self, chain: DevChain) -> None:
        super().__init__(chain)
        self.blipped = False

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        if method == "eth_call" and params[1] == "pending" and not self.blipped:
            self.blipped = True
            self.calls.append((method, "pending"))
            raise RpcError(-32005, "limit exceeded")
        return await super().request(method, params)


async def test_a_passing_error_does_not_turn_off_the_pending_block_check(
    chain: DevChain,
) -> None:
    node = PendingBlips(chain)
    ledger = EvmLedger(node, chain.accounts[8].account, network=chain.network)
    merchant = EvmAccount.generate().address
    for _ in range(2):
        assert (
            await ledger.settle(verified(chain, fund(chain), offer_on(chain, merchant)))
        ).success
    assert node.count("eth_call", "latest") == 1  # only the call that blipped
    assert node.count("eth_call", "pending") == 2
