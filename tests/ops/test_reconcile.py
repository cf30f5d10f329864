"""Reconciliation against the embedded chain: unfinished claims end settled or released, by what
the chain says, and nothing is broadcast twice."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest

from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.ledgers.evm import EvmLedger, encode_transfer_with_authorization
from farebox.ops.reconcile import Reconciler, parse_claim_key
from farebox.protocol.models import Offer
from farebox.schemes.evm_exact import VerifiedEvmProof, make_proof, verify
from farebox.store.memory import MemoryStore
from tests.support.chain import fund
from tests.support.faults import HiddenReceipts

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def proof_for(chain: DevChain, payer: EvmAccount, merchant: str) -> VerifiedEvmProof:
    asset = chain.asset
    offer = Offer(
        "exact",
        asset.network,
        10_000,
        asset.address,
        merchant,
        extra={"name": asset.name, "version": asset.version},
    )
    now = int(time.time())
    return verify(make_proof(payer, offer, now=now, nonce=os.urandom(32)), offer, now=now)


def ledger_of(chain: DevChain, account: int = 1) -> EvmLedger:
    return EvmLedger(chain.rpc, chain.accounts[account].account, network=chain.network)


def test_claim_keys_parse() -> None:
    key = f"eip155:1/0x{'ab' * 20}/{'cd' * 20}/{'ef' * 32}"
    parsed = parse_claim_key(key)
    assert parsed is not None
    assert parsed[2] == bytes.fromhex("cd" * 20)
    assert parse_claim_key("eip155:1/x/zz/00") is None
    assert parse_claim_key("not a key") is None


async def test_pending_broadcast_that_landed_becomes_settled(chain: DevChain) -> None:
    store, merchant = MemoryStore(), EvmAccount.generate().address
    proof = proof_for(chain, fund(chain), merchant)
    slow = EvmLedger(
        HiddenReceipts(chain), chain.accounts[2].account, network=chain.network, confirm_timeout=0.1
    )
    assert await store.claim(proof.claim_key, owner="o", now=int(time.time()))
    settlement = await slow.settle(proof)
    assert settlement.pending
    await store.finish(
        proof.claim_key, owner="o", state="pending", transaction=settlement.transaction
    )
    report = await Reconciler(store, [ledger_of(chain)]).run_once()
    assert (report.settled, report.released, report.waiting) == (1, 0, 0)
    claim = await store.get_claim(proof.claim_key)
    assert claim is not None
    assert claim.state == "settled"
    assert claim.transaction == settlement.transaction
    [event] = await store.events(kind="reconciliation")
    assert event.data["outcome"] == "settled"
    assert chain.balance_of(merchant) == 10_000  # once: reconciliation never sends anything


async def test_a_process_that_died_after_settling_is_found_by_its_log(chain: DevChain) -> None:
    store, merchant = MemoryStore(), EvmAccount.generate().address
    proof = proof_for(chain, fund(chain), merchant)
    # Claimed, settled on chain, then the process died before recording anything.
    assert await store.claim(proof.claim_key, owner="dead", now=int(time.time()) - 600)
    settlement = await ledger_of(chain, 3).settle(proof)
    assert settlement.success
    report = await Reconciler(store, [ledger_of(chain)], held_grace=60).run_once()
    assert report.settled == 1
    claim = await store.get_claim(proof.claim_key)
    assert claim is not None
    assert (claim.state, claim.transaction) == ("settled", settlement.transaction)


async def test_a_claim_that_never_moved_money_is_released_and_the_proof_works_again(
    chain: DevChain,
) -> None:
    store, merchant = MemoryStore(), EvmAccount.generate().address
    proof = proof_for(chain, fund(chain), merchant)
    assert await store.claim(proof.claim_key, owner="dead", now=int(time.time()) - 7200)
    young = proof_for(chain, fund(chain), merchant)
    assert await store.claim(young.claim_key, owner="busy", now=int(time.time()) - 600)
    report = await Reconciler(
        store, [ledger_of(chain)], held_grace=60, release_after=3600
    ).run_once()
    assert (report.settled, report.released, report.waiting) == (0, 1, 1)
    assert await store.get_claim(proof.claim_key) is None
    assert await store.claim(proof.claim_key, owner="retry", now=int(time.time()))
    assert (await ledger_of(chain, 4).settle(proof)).success


async def test_a_reverted_transaction_releases_its_claim(chain: DevChain) -> None:
    store, merchant = MemoryStore(), EvmAccount.generate().address
    proof = proof_for(chain, EvmAccount.generate(), merchant)  # an unfunded payer
    assert await store.claim(proof.claim_key, owner="o", now=int(time.time()))
    # Sent as is, never simulated (the ledger refuses to broadcast a transfer that would revert):
    # mined, reverted.
    data = "0x" + encode_transfer_with_authorization(proof).hex()
    call = {"from": chain.accounts[4].address, "to": chain.token, "data": data, "gas": "0x30d40"}
    failed = chain.handle("eth_sendTransaction", [call])
    assert chain.handle("eth_getTransactionReceipt", [failed])["status"] == "0x0"
    await store.finish(proof.claim_key, owner="o", state="pending", transaction=failed)
    report = await Reconciler(store, [ledger_of(chain)]).run_once()
    assert report.released == 1
    assert await store.get_claim(proof.claim_key) is None


async def test_unknown_networks_and_recent_unknowns_wait(chain: DevChain) -> None:
    store = MemoryStore()
    key = f"eip155:1/0x{'ab' * 20}/{'cd' * 20}/{'ef' * 32}"
    assert await store.claim(key, owner="o", now=0)
    await store.finish(key, owner="o", state="pending", transaction="0x" + "11" * 32)
    report = await Reconciler(store, [ledger_of(chain)]).run_once()
    assert report.waiting == 1
    assert (await store.get_claim(key)) is not None


async def test_an_operator_resolves_only_unfinished_x402_claims_no_longer_in_flight() -> None:
    from farebox.errors import PaymentError

    store, now = MemoryStore(), int(time.time())
    key = f"eip155:1/0x{'11' * 20}/{'22' * 20}/{'33' * 32}"
    reconciler = Reconciler(store, [], held_grace=120, clock=lambda: now)
    assert await store.claim("mpp/challenge-id", owner="o", now=now - 1000)
    with pytest.raises(PaymentError) as card:
        await reconciler.resolve_by_hand("mpp/challenge-id", settled=False, transaction=None)
    assert card.value.code == "invalid_claim"
    assert await store.get_claim("mpp/challenge-id") is not None  # card claims stay held
    assert await store.claim(key, owner="o", now=now - 5)
    with pytest.raises(PaymentError, match="may still run"):
        await reconciler.resolve_by_hand(key, settled=True, transaction="0x" + "ab" * 32)
    later = Reconciler(store, [], held_grace=120, clock=lambda: now + 200)
    assert await later.resolve_by_hand(key, settled=True, transaction="0x" + "ab" * 32)
    claim = await store.get_claim(key)
    assert claim is not None
    assert (claim.state, claim.transaction) == ("settled", "0x" + "ab" * 32)
    [event] = await store.events(kind="reconciliation")
    assert event.data["by"] == "operator"
    assert not await later.resolve_by_hand(key, settled=False, transaction=None)  # settled stays


async def test_a_pending_claim_without_its_logged_proof_is_not_settled_by_anothers_transfer(
    chain: DevChain,
) -> None:
    """The payer's nonce was used by another authorization (to someone else). A pending claim's
    proof is logged with it; when it cannot be found, the transfer cannot be checked against it,
    and the claim waits (for an operator) rather than being confirmed by someone else's money."""
    store, payer = MemoryStore(), fund(chain)
    mine = proof_for(chain, payer, EvmAccount.generate().address)
    assert await store.claim(mine.claim_key, owner="o", now=int(time.time()))
    await store.finish(mine.claim_key, owner="o", state="pending", transaction=None)
    other_offer = replace(mine.offer, pay_to=EvmAccount.generate().address)
    now = int(time.time())
    nonce = mine.authorization.nonce
    theirs = verify(make_proof(payer, other_offer, now=now, nonce=nonce), other_offer, now=now)
    assert (await ledger_of(chain, 4).settle(theirs)).success
    report = await Reconciler(store, [ledger_of(chain)]).run_once()
    assert (report.settled, report.waiting) == (0, 1)
    claim = await store.get_claim(mine.claim_key)
    assert claim is not None
    assert claim.state == "pending"
