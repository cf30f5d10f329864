"""Paying a 402 in a test: the headers an agent would send, signed with farebox's own code.

:func:`make_payment` answers an x402 challenge the way farebox's agent does (an EIP-3009
authorization signed by :func:`~farebox.schemes.evm_exact.make_proof`, encoded by
:func:`~farebox.protocol.x402.encode_proof`), minus the agent's budget, policy and receipt book;
:func:`make_card_payment` answers an MPP ``stripe`` challenge with a Shared Payment Token. Both
return headers to add to the retried request.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any, Protocol

from farebox._wire import IDEMPOTENCY_KEY as _IDEMPOTENCY_KEY
from farebox._wire import PAYMENT_IDENTIFIER
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.protocol import mpp
from farebox.protocol.challenge import read_challenge
from farebox.protocol.models import Challenge, Offer
from farebox.protocol.x402 import PAYMENT_SIGNATURE, X_PAYMENT, encode_proof
from farebox.schemes import evm_exact
from farebox.testing.keys import TEST_PAYER

__all__ = ["PAYMENT_IDENTIFIER", "Response402", "make_card_payment", "make_payment", "read_402"]

#: The x402 extension that carries an idempotency id in the proof (and its HTTP header twin).


class Response402(Protocol):
    """A response as HTTP clients give it (httpx, requests, Starlette's ``TestClient``)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> bytes: ...


def read_402(response: Response402) -> Challenge:
    """The x402 challenge of a 402 ``response`` (its ``PAYMENT-REQUIRED`` header or its body).

    Raises :class:`ValueError` for a response that is not a 402, and
    :class:`~farebox.errors.PaymentError` for one that carries no readable challenge."""
    if response.status_code != 402:
        raise ValueError(f"expected a 402 response, got {response.status_code}")
    return read_challenge(response.headers, response.content)


def _pick(challenge: Challenge, network: str | None) -> Offer:
    for offer in challenge.accepts:
        if offer.scheme != evm_exact.SCHEME or not offer.network.startswith("eip155:"):
            continue
        if network is None or offer.network == network:
            return offer
    where = f" on {network}" if network is not None else ""
    raise PaymentError("no_payable_offer", f"the challenge offers no exact EVM payment{where}")


def make_payment(
    payable: Challenge | Offer | Response402,
    *,
    account: EvmAccount = TEST_PAYER,
    now: int | None = None,
    nonce: bytes | None = None,
    request_id: str | None = None,
    network: str | None = None,
) -> dict[str, str]:
    """The headers that pay ``payable``: ``{"PAYMENT-SIGNATURE": ...}`` (``X-PAYMENT`` for an
    x402 v1 challenge), as farebox's agent sends them.

    ``payable`` is the 402 response itself, the :class:`~farebox.protocol.models.Challenge` read
    from it (the first ``exact`` EVM offer is paid, or the first on ``network``), or one
    :class:`~farebox.protocol.models.Offer`. ``account`` signs (the public :data:`TEST_PAYER` by
    default); ``now`` (Unix seconds, the clock by default) dates the authorization, valid from 600
    seconds before it to ``now + maxTimeoutSeconds``; ``nonce`` (32 bytes, random by default)
    names it: the same ``nonce`` and ``now`` sign the same authorization again, which a server
    settles once. ``request_id`` (16 to 128 of ``[A-Za-z0-9_-]``) makes the request idempotent:
    it rides in the proof's ``payment-identifier`` extension when the challenge declares it, and
    in ``Idempotency-Key``.
    """
    if isinstance(payable, Offer):
        challenge = None
        offer = payable
    else:
        challenge = payable if isinstance(payable, Challenge) else read_402(payable)
        offer = _pick(challenge, network)
    signed = evm_exact.make_proof(
        account,
        offer,
        now=int(time.time()) if now is None else now,
        nonce=secrets.token_bytes(32) if nonce is None else nonce,
        resource=challenge.resource if challenge is not None else None,
        x402_version=challenge.x402_version if challenge is not None else 2,
        extensions=_with_request_id(challenge, request_id),
    )
    header = PAYMENT_SIGNATURE if signed.x402_version == 2 else X_PAYMENT
    headers = {header: encode_proof(signed)}
    if request_id is not None:
        headers[_IDEMPOTENCY_KEY] = request_id
    return headers


def _with_request_id(challenge: Challenge | None, request_id: str | None) -> dict[str, Any] | None:
    # The agent's way: echo the server's declaration and add the id to its ``info`` (v2 only).
    if challenge is None or request_id is None or challenge.x402_version != 2:
        return None
    declared = challenge.extensions.get(PAYMENT_IDENTIFIER)
    if not isinstance(declared, Mapping):
        return None
    info = declared.get("info")
    entry = {**declared, "info": {**(info if isinstance(info, Mapping) else {}), "id": request_id}}
    return {PAYMENT_IDENTIFIER: entry}


def make_card_payment(
    payable: mpp.Challenge | Response402, *, spt: str | None = None
) -> dict[str, str]:
    """The headers that pay an MPP ``stripe`` charge challenge with a Shared Payment Token:
    ``{"Authorization": "Payment ..."}`` (or the challenge's own credential header).

    ``payable`` is the 402 response (its first ``stripe`` challenge in ``WWW-Authenticate`` is
    answered) or one :class:`~farebox.protocol.mpp.Challenge`. ``spt`` is the token; by default
    a fresh ``spt_succeeds_…``, which :class:`~farebox.testing.FakeCardLedger` charges
    successfully (its docstring lists the tokens that decline, need 3-D Secure or expired).
    """
    if isinstance(payable, mpp.Challenge):
        challenge = payable
    else:
        if payable.status_code != 402:
            raise ValueError(f"expected a 402 response, got {payable.status_code}")
        # Every WWW-Authenticate line, whatever the client's header type and name spelling.
        lines = ", ".join(
            v for k, v in payable.headers.items() if k.lower() == mpp.WWW_AUTHENTICATE.lower()
        )
        found = [c for c in mpp.parse_www_authenticate(lines) if c.method == "stripe"]
        if not found:
            raise PaymentError("no_payable_offer", "the 402 offers no stripe charge challenge")
        challenge = found[0]
    token = spt if spt is not None else "spt_succeeds_" + secrets.token_hex(8)
    credential = mpp.Credential(
        challenge=challenge.echo(), payload=mpp.StripePayload(token).to_json()
    )
    return {challenge.header or mpp.AUTHORIZATION: mpp.render_authorization(credential)}
