"""Test helpers: test a paid app without a chain, a Stripe account or a network. TEST ONLY.

Everything here is for tests and moves no money: the fakes keep the rules of what they stand for
and settle in memory, and the keys are public (anyone can sign with them).

* :class:`FakeFacilitator` stands where a facilitator goes (``Gate(routes, FakeFacilitator(),
  ...)``): it settles x402 ``exact`` EVM payments at once with a deterministic fake transaction
  hash, once per authorization, keeps what it settled, and can be told to fail or leave pending
  the next settlement.
* :class:`FakeCardLedger` (needs the ``stripe`` extra) stands where the card rail's Stripe ledger
  goes: farebox's own Stripe ledger over an in-process fake of Stripe's documented API.
* :func:`make_payment` returns the headers that pay a 402 (``PAYMENT-SIGNATURE``), signed with
  farebox's own code by :data:`TEST_PAYER`; :func:`make_card_payment` the ``Authorization:
  Payment`` credential for a card challenge.
* Fixed keys and a known asset: :data:`TEST_PAYER`, :data:`TEST_PAY_TO`,
  :data:`TEST_SIGNING_KEY` (receipts), :data:`TEST_CARD_SECRET`, :data:`TEST_ASSET`
  (the embedded chain's USDC) and :data:`TEST_NETWORK`.

A test of a paid app: get the 402, pay it, retry, check the answer::

    gate = Gate(routes, FakeFacilitator(), MemoryStore(), signing_key=TEST_SIGNING_KEY)
    app = PaymentMiddleware(my_app, gate)
    first = await client.get("/report")            # 402
    paid = await client.get("/report", headers=make_payment(first))
    assert paid.status_code == 200

Importing this module loads neither the embedded chain (py-evm) nor Stripe's library: only the
protocol core and the fakes.
"""

from __future__ import annotations

import typing as _typing

from farebox.testing.facilitator import FakeFacilitator, FakeTransfer, fake_transaction
from farebox.testing.keys import (
    TEST_ASSET,
    TEST_CARD_SECRET,
    TEST_NETWORK,
    TEST_PAY_TO,
    TEST_PAYER,
    TEST_PAYER_KEY,
    TEST_SIGNING_KEY,
    TEST_SIGNING_SEED,
)
from farebox.testing.payments import Response402, make_card_payment, make_payment, read_402

if _typing.TYPE_CHECKING:
    from farebox.testing.card import FakeCardLedger

__all__ = [
    "TEST_ASSET",
    "TEST_CARD_SECRET",
    "TEST_NETWORK",
    "TEST_PAYER",
    "TEST_PAYER_KEY",
    "TEST_PAY_TO",
    "TEST_SIGNING_KEY",
    "TEST_SIGNING_SEED",
    "FakeCardLedger",
    "FakeFacilitator",
    "FakeTransfer",
    "Response402",
    "fake_transaction",
    "make_card_payment",
    "make_payment",
    "read_402",
]


def __getattr__(name: str) -> _typing.Any:
    # The card fake imports Stripe's library (about 0.2 s, and an optional extra): on first use.
    if name == "FakeCardLedger":
        from farebox.testing.card import FakeCardLedger

        globals()[name] = FakeCardLedger
        return FakeCardLedger
    raise AttributeError(f"module 'farebox.testing' has no attribute {name!r}")
