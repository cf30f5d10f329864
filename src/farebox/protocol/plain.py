"""The plain JSON 402 body: what a person or a simple agent reads first.

``{"detail": "...", "payment": {"protocol": "x402", "amount": "0.01", "currency": "USDC",
"reference": "...", "instructions": "...", "methods": [...]}}``, the amount in display units. Each
method is a complete x402 v2 offer plus ``protocol`` and a display ``price``, so an agent that reads
only this body still has everything it needs to pay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from farebox.errors import PaymentError
from farebox.money import ASSETS, AssetRegistry
from farebox.protocol.models import Challenge, Offer, Resource
from farebox.protocol.x402 import offer_from_json, offer_to_json

__all__ = ["decode_plain_body", "display_price", "plain_body"]

_INSTRUCTIONS = (
    "Pay with x402: choose one of the methods, sign an EIP-3009 transferWithAuthorization for "
    "exactly its amount to its payTo, and resend this request with the x402 v2 PaymentPayload, "
    "base64-encoded, in the PAYMENT-SIGNATURE header (X-PAYMENT for x402 v1). The response carries "
    "the settlement in PAYMENT-RESPONSE and a signed receipt in PEAC-Receipt."
)


def display_price(offer: Offer, assets: AssetRegistry = ASSETS) -> tuple[str, str]:
    """``(amount, currency)`` of an offer in display units; atomic units when the asset is unknown."""
    asset = assets.find(offer.network, offer.asset)
    if asset is None:
        return str(offer.amount), offer.asset
    return asset.format(offer.amount), asset.symbol


def plain_body(
    challenge: Challenge,
    *,
    assets: AssetRegistry = ASSETS,
    detail: str | None = None,
    extra_methods: Sequence[Mapping[str, Any]] = (),
    extra_instructions: str | None = None,
) -> dict[str, Any]:
    """The plain body for ``challenge``; the first offer sets the headline amount and currency.

    ``extra_methods`` (other protocols' entries, such as a card) follow the x402 ones, and
    ``extra_instructions`` (how to pay them) follow the x402 instructions.
    """
    if not challenge.accepts:
        raise ValueError("a challenge needs at least one offer")
    amount, currency = display_price(challenge.accepts[0], assets)
    methods = []
    for offer in challenge.accepts:
        shown, symbol = display_price(offer, assets)
        methods.append({"protocol": "x402", "price": f"{shown} {symbol}", **offer_to_json(offer)})
    methods.extend(dict(m) for m in extra_methods)
    payment: dict[str, Any] = {
        "protocol": "x402",
        "amount": amount,
        "currency": currency,
        "reference": challenge.reference,
        "resource": challenge.resource.url,
        "instructions": _INSTRUCTIONS + (" " + extra_instructions if extra_instructions else ""),
        "methods": methods,
    }
    if payment["reference"] is None:
        del payment["reference"]
    return {
        "detail": detail or f"Payment required: {amount} {currency} for {challenge.resource.url}",
        "payment": payment,
    }


def decode_plain_body(data: Mapping[str, Any]) -> Challenge:
    """Read the offers out of a plain body (methods of other protocols are skipped)."""
    payment = data.get("payment")
    if not isinstance(payment, Mapping):
        raise PaymentError("invalid_payload", "body has no payment object")
    methods = payment.get("methods")
    if not isinstance(methods, list) or not 0 < len(methods) <= 32:
        raise PaymentError("invalid_payload", "payment.methods must be a list of 1 to 32 methods")
    offers = tuple(
        offer_from_json(m, f"payment.methods[{i}]")
        for i, m in enumerate(methods)
        if isinstance(m, Mapping) and m.get("protocol") == "x402"
    )
    if not offers:
        raise PaymentError("invalid_payload", "payment.methods offers no x402 method")
    reference = payment.get("reference")
    url = payment.get("resource")
    detail = data.get("detail")
    return Challenge(
        resource=Resource(url if isinstance(url, str) else ""),
        accepts=offers,
        error=detail if isinstance(detail, str) else "",
        reference=reference if isinstance(reference, str) else None,
        x402_version=2,
    )
