"""The agent's card: Shared Payment Tokens minted with the agent's own Stripe account.

An MPP ``stripe``/``charge`` challenge names the seller's Stripe profile (``methodDetails.networkId``)
and the price in minor units. :class:`CardWallet` answers it by minting a Shared Payment Token
(``POST /v1/shared_payment/issued_tokens``, a preview endpoint the ``stripe`` library has no
resource for, so it goes through :meth:`stripe.StripeClient.raw_request`) limited to exactly that
amount and currency, to that seller, until the challenge expires. The token is then presented to
the seller, who charges it; the agent's key never leaves this object.

Minting is I/O, and :meth:`farebox.agent.agent.Agent.pay` is sans-I/O: it yields a
:class:`MintToken` step and the driver runs :meth:`CardWallet.mint` (sync clients) or
:meth:`CardWallet.mint_async` (``httpx.AsyncClient``), both built on one request description
(:class:`MintRequest`). The ``Idempotency-Key`` is derived from the challenge id and the payment
method, so one payment never mints twice even when a call is repeated after a lost answer.

Errors are :class:`~farebox.errors.PaymentError` codes with Stripe's machine codes at most, never its
free text (which can quote a redacted key), the key or a token: ``card_declined``,
``card_token_invalid`` (Stripe refused to mint: unknown payment method, bad limits),
``idempotency_conflict`` and ``ledger_unavailable`` (network, authentication, Stripe errors, an
answer without a token).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from farebox.errors import ConfigError, PaymentError
from farebox.protocol import mpp

if TYPE_CHECKING:
    import stripe

__all__ = [
    "ISSUED_TOKENS_PATH",
    "MAX_TOKEN_LIFETIME",
    "CardWallet",
    "MintRequest",
    "MintToken",
    "mint_idempotency_key",
]

ISSUED_TOKENS_PATH = "/v1/shared_payment/issued_tokens"
#: The longest a token is minted for when the challenge sets no earlier expiry (pympp and mppx
#: use now + 3600 for a challenge without ``expires``).
MAX_TOKEN_LIFETIME = 3600

_PAYMENT_METHOD = re.compile(r"pm_[A-Za-z0-9_]{1,250}")
_CURRENCY = re.compile(r"[a-z]{3}")


def mint_idempotency_key(challenge_id: str, payment_method: str) -> str:
    """``"farebox_mint_" + sha256(challenge_id NUL payment_method)``: one token per challenge and
    card, whatever retries happen; hashed so the key has a fixed length and shows no challenge
    data in Stripe's logs."""
    digest = hashlib.sha256(challenge_id.encode() + b"\x00" + payment_method.encode()).hexdigest()
    return "farebox_mint_" + digest


@dataclass(frozen=True, slots=True)
class MintRequest:
    """One ``issued_tokens`` create call, fully decided before any I/O.

    ``max_amount`` is in minor units of ``currency`` (lower case); ``expires_at`` Unix seconds;
    ``seller`` the seller's Stripe profile the token is usable by.
    """

    payment_method: str
    currency: str
    max_amount: int
    expires_at: int
    seller: str
    idempotency_key: str

    def params(self) -> dict[str, Any]:
        """The form parameters (the library encodes nested dicts as ``a[b]``)."""
        return {
            "payment_method": self.payment_method,
            "usage_limits": {
                "currency": self.currency,
                "max_amount": self.max_amount,
                "expires_at": self.expires_at,
            },
            "seller_details": {"network_business_profile": self.seller},
        }


class MintToken(NamedTuple):
    """A flow step: mint a token with ``wallet`` for ``request`` and send back its id (``spt_…``).

    A driver calls ``wallet.mint(request)`` (or ``await wallet.mint_async(request)``) and sends the
    result into the flow; when the call raises, it throws the error into the flow.
    """

    wallet: CardWallet
    request: MintRequest


class CardWallet:
    """A card on the agent's own Stripe account, paying MPP ``stripe`` charges.

    ``client`` is a :class:`stripe.StripeClient` holding the AGENT's secret key (for
    :meth:`mint_async` it needs an async-capable HTTP client, e.g. ``stripe.HTTPXClient()``);
    ``payment_method`` the saved card (``pm_…``). ``label`` names the payer in records and errors
    (never the key). ``stripe_version`` defaults to the preview that knows Shared Payment Tokens.
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        payment_method: str,
        *,
        label: str = "",
        stripe_version: str | None = None,
        max_lifetime: int = MAX_TOKEN_LIFETIME,
        payment_method_type: str = "card",
    ) -> None:
        if not isinstance(payment_method, str) or not _PAYMENT_METHOD.fullmatch(payment_method):
            raise ConfigError("payment_method must be a Stripe PaymentMethod id (pm_…)")
        if isinstance(max_lifetime, bool) or not isinstance(max_lifetime, int) or max_lifetime < 60:
            raise ConfigError("max_lifetime must be an int of at least 60 seconds")
        if stripe_version is None:
            from farebox.ledgers.stripe import STRIPE_PREVIEW_VERSION

            stripe_version = STRIPE_PREVIEW_VERSION
        self._client = client
        self.payment_method = payment_method
        self.label = label
        self.stripe_version = stripe_version
        self.max_lifetime = max_lifetime
        self.payment_method_type = payment_method_type

    def __repr__(self) -> str:
        # The client (and its key) stays out of reprs and tracebacks.
        return f"CardWallet(payment_method={self.payment_method!r}, label={self.label!r})"

    # --- deciding (no I/O) ---------------------------------------------------------------------

    def refusal(self, challenge: mpp.Challenge, *, now: float) -> str | None:
        """Why this wallet cannot pay ``challenge``, or ``None`` when it can."""
        if challenge.method != "stripe" or challenge.intent != "charge":
            return f"payment method {challenge.method}/{challenge.intent} is not supported"
        try:
            details = mpp.StripeDetails.from_request(challenge.request)
        except PaymentError as exc:
            return f"card challenge: {exc.message}"
        if self.payment_method_type not in details.payment_method_types:
            return f"the card challenge takes no {self.payment_method_type}"
        if details.metadata.get("externalId") is not None:
            return "the card challenge's metadata.externalId is reserved"
        if challenge.request.external_id is not None:
            # A seller-bound external id must be echoed and put in seller_details; not supported.
            return "card challenges with an externalId are not supported"
        if challenge.request.amount < 1:
            return "the card challenge asks for nothing"
        if not _CURRENCY.fullmatch(challenge.request.currency.lower()):
            return f"currency {challenge.request.currency[:12]!r} is not an ISO 4217 code"
        expires = challenge.expires_at
        if expires is not None and expires.timestamp() <= now + 5:
            return "the card challenge has expired"
        return None

    def mint_request(self, challenge: mpp.Challenge, *, now: float) -> MintRequest:
        """The token to mint for ``challenge``: exactly its amount and currency, its seller, until
        it expires (capped at ``max_lifetime`` from ``now``)."""
        why = self.refusal(challenge, now=now)
        if why is not None:
            raise PaymentError("no_payable_offer", why)
        details = mpp.StripeDetails.from_request(challenge.request)
        expires = challenge.expires_at
        latest = int(now) + self.max_lifetime
        expires_at = latest if expires is None else min(int(expires.timestamp()), latest)
        return MintRequest(
            payment_method=self.payment_method,
            currency=challenge.request.currency.lower(),
            max_amount=challenge.request.amount,
            expires_at=expires_at,
            seller=details.network_id,
            idempotency_key=mint_idempotency_key(challenge.id, self.payment_method),
        )

    # --- minting (I/O) --------------------------------------------------------------------------

    def _options(self, request: MintRequest) -> dict[str, Any]:
        return {
            "stripe_version": self.stripe_version,
            "idempotency_key": request.idempotency_key,
            # A retry inside the library would be answered "Idempotent-Replayed" with the same
            # token: harmless, but the caller's retry policy is the one that counts.
            "max_network_retries": 0,
        }

    def mint(self, request: MintRequest) -> str:
        """Mint the token (blocking); its id."""
        import stripe

        try:
            response = self._client.raw_request(
                "post", ISSUED_TOKENS_PATH, **request.params(), **self._options(request)
            )
        except stripe.StripeError as exc:
            raise _mint_error(exc) from None
        return _token_of(response.data, request)

    async def mint_async(self, request: MintRequest) -> str:
        """Mint the token without blocking the event loop; its id."""
        import stripe

        try:
            response = await self._client.raw_request_async(
                "post", ISSUED_TOKENS_PATH, **request.params(), **self._options(request)
            )
        except stripe.StripeError as exc:
            raise _mint_error(exc) from None
        return _token_of(response.data, request)


def _mint_error(exc: Exception) -> PaymentError:
    import stripe

    code = getattr(exc, "code", None)
    detail = code if isinstance(code, str) and code.isidentifier() else type(exc).__name__
    if isinstance(exc, stripe.CardError):
        return PaymentError("card_declined", f"the card was declined ({detail})")
    if isinstance(exc, stripe.IdempotencyError):
        return PaymentError("idempotency_conflict", "this challenge was minted with other terms")
    if isinstance(exc, stripe.InvalidRequestError) and exc.http_status in (400, 404):
        return PaymentError("card_token_invalid", f"Stripe refused to mint the token ({detail})")
    status = getattr(exc, "http_status", None)
    suffix = f" (HTTP {status})" if status else ""
    return PaymentError("ledger_unavailable", f"Stripe token mint failed: {detail}{suffix}")


def _token_of(data: object, request: MintRequest) -> str:
    if not isinstance(data, Mapping):
        raise PaymentError("ledger_unavailable", "Stripe answered the mint without an object")
    token = data.get("id")
    if not mpp.is_spt(token):
        raise PaymentError("ledger_unavailable", "Stripe answered the mint without a token id")
    limits = data.get("usage_limits")
    # Stripe echoes the limits; a token with looser ones than asked is not presented.
    if isinstance(limits, Mapping) and (
        limits.get("max_amount") not in (None, request.max_amount)
        or limits.get("currency") not in (None, request.currency)
    ):
        raise PaymentError("ledger_unavailable", "Stripe minted a token with other limits")
    return token
