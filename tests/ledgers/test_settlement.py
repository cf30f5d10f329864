"""Settlement on the embedded chain: success, each revert's code, pending, and an unreachable node."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import pytest

from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.ledgers.devchain import DevChain
from farebox.ledgers.evm import EvmLedger
from farebox.ledgers.rpc import HttpRpc, RpcUnavailable
from farebox.protocol.models import Offer
from farebox.schemes.evm_exact import VerifiedEvmProof, make_proof, verify
from tests.e2e.conftest import HiddenReceipts, fund

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def chain() -> DevChain:
    return DevChain()


def offer_on(chain: DevChain, pay_to: str, amount: int = 10_000) -> Offer:
    asset = chain.asset
    return Offer(
        "exact",
        asset.network,
        amount,
        asset.address,
        pay_to,
        extra={"name": asset.name, "version": asset.version},
    )


def verified(
    chain: DevChain, payer: EvmAccount, offer: Offer, now: int | None = None
) -> VerifiedEvmProof:
    now = int(time.time()) if now is None else now
    proof = make_proof(payer, offer, now=now, nonce=os.urandom(32))
    return verify(proof, offer, now=now)


async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
    if method == "eth_getTransactionReceipt":
        return None
    return await self.inner.request(method, params)


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
    again = await ledger.settle(proof)
    assert not again.success
    assert again.error_reason == "invalid_exact_evm_nonce_already_used"
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
