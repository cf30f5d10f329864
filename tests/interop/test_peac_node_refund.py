"""Cross-check: a card refund record (event ``refund``, negative ``amount_minor``, linked to the
payment's record by ``org.peacprotocol/correlation`` ``parent_jti``) passes the reference
TypeScript packages (``@peac/crypto`` ``verify()`` and ``@peac/schema`` ``parseReceiptClaims()``),
as the payment record it refunds does.

The refund is made by :func:`farebox.server.refunds.refund_payment` itself, with a stand-in for the
Stripe ledger that answers what Stripe answers to a refund (the record, not Stripe, is under test).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import anyio
import pytest

from farebox.receipts import SigningKey, issue_receipt, payment_claims, rfc3339, uuid7
from farebox.receipts.records import COMMERCE_EXTENSION, receipt_ref, verify_receipt
from farebox.server.refunds import CORRELATION_EXTENSION, refund_payment
from farebox.store.base import Event
from farebox.store.memory import MemoryStore
from tests.support.node import node_verify

pytestmark = pytest.mark.node

INTENT = "pi_3RefundInterop000001"
REFUND = "re_3RefundInterop000001"


class Refunds:
    """Answers a refund as Stripe does (a ``CardRefund``), remembering what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int | None]] = []

    async def refund(
        self,
        payment_intent_id: str,
        amount: int | None = None,
        *,
        idempotency_key: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Any:
        from farebox.ledgers.stripe import CardRefund

        self.asked.append((payment_intent_id, amount))
        return CardRefund(REFUND, payment_intent_id, amount or 0, "usd", "succeeded")


async def refund_record(key: SigningKey) -> tuple[str, str]:
    now = int(time.time())
    original = issue_receipt(
        payment_claims(
            iss=key.did_key,
            iat=now,
            jti=uuid7(now * 1000),
            payment_rail="stripe",
            amount_minor=500,
            currency="USD",
            event="settlement",
            reference=INTENT,
            sub="https://api.example.com/report",
            occurred_at=rfc3339(now),
        ),
        key,
    ).jws
    store = MemoryStore()
    ref = receipt_ref(original)
    await store.append(
        Event(
            "receipt",
            now,
            "GET /report",
            reference=ref,
            data={"transaction": INTENT, "jws": original},
        )
    )
    ledger = Refunds()
    result = await refund_payment(
        store, cast("Any", ledger), receipt_ref=ref, amount=150, signing_key=key
    )
    assert ledger.asked == [(INTENT, 150)]
    return original, result.record


def test_reference_packages_accept_a_refund_record(node: str) -> None:
    pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")
    key = SigningKey.generate()
    original, refund = anyio.run(refund_record, key)
    ours = verify_receipt(refund, None, now=int(time.time()), issuer=key.did_key)
    assert ours.warnings == ()
    commerce = ours.claims["extensions"][COMMERCE_EXTENSION]
    assert (commerce["event"], commerce["amount_minor"], commerce["reference"]) == (
        "refund",
        "-150",
        REFUND,
    )
    parent = verify_receipt(original, None, now=int(time.time())).claims["jti"]
    assert ours.claims["extensions"][CORRELATION_EXTENSION] == {"parent_jti": parent}

    results = node_verify(node, [(original, key.public_key), (refund, key.public_key)])
    for jws, result in zip((original, refund), results, strict=True):
        assert "error" not in result, result
        assert result["signature_valid"] is True
        claims = verify_receipt(jws, None, now=int(time.time())).claims
        assert result["parse"] == {"ok": True, "wire_version": "0.2", "claims": claims}
