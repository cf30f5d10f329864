"""Card payments through Stripe: Shared Payment Tokens (MPP ``stripe``/``charge``) and X-Receipt.

Three calls, each one request to Stripe through the official ``stripe`` library (16.x), using its
native async methods (``create_async``, ``retrieve_async``), so no thread is tied up while Stripe
answers. The :class:`stripe.StripeClient` needs an async-capable HTTP client: the one it builds when
given none has an httpx fallback for async calls (farebox depends on httpx and anyio), or pass
``http_client=stripe.HTTPXClient()``. A client built with only ``new_default_http_client()`` (sync
``requests``, no async fallback) cannot drive this ledger. stripe 16.1's ``HTTPXClient`` hands httpx
the body as ``data=<bytes>``, for which httpx 0.28 emits a ``DeprecationWarning`` on every POST.

* :meth:`StripeLedger.charge` creates and confirms a PaymentIntent with the agent's Shared Payment
  Token (``spt_…``) in one call, the way the MPP Stripe method describes (``draft-stripe-charge-00``)
  and the official SDK ``pympp`` 0.16.0 does it, then checks the answer itself (status, amount,
  currency, challenge id) rather than trusting that Stripe enforced the token's limits.
* :meth:`StripeLedger.retrieve_paid` checks a PaymentIntent presented as an ``X-Receipt``.
* :meth:`StripeLedger.refund` refunds through the ordinary Refunds API (MPP has no refund protocol).

Errors are translated here, at the boundary: every failure is a :class:`~farebox.errors.PaymentError`
whose message carries Stripe's machine codes at most, never Stripe's free text (which can quote a
redacted key), the API key, the token or a URL.

Reason codes beyond ``errors.REASONS`` (unknown codes answer 402 through ``reason_for``):
``card_declined``, ``card_action_required``, ``card_token_invalid``, ``card_payment_failed``,
``card_payment_not_found``, ``card_payment_mismatch``, ``card_payment_refunded``, ``refund_refused``.
Existing ones used: ``invalid_payload`` (400), ``idempotency_conflict`` (409),
``ledger_unavailable`` (503).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import stripe
from farebox.errors import ConfigError, PaymentError
from farebox.protocol import mpp

if TYPE_CHECKING:
    from stripe.params import PaymentIntentCreateParams, RefundCreateParams

__all__ = [
    "CHALLENGE_METADATA_KEY",
    "REFERENCE_METADATA_KEY",
    "STRIPE_PREVIEW_VERSION",
    "CardCharge",
    "CardRefund",
    "InvoicePayment",
    "SptPlacement",
    "StripeLedger",
    "idempotency_key_for",
    "stripe_client",
]

# The preview API version that knows Shared Payment Tokens: pympp 0.16.0
# (_defaults.MACHINE_PAYMENTS_API_VERSION) and mppx (stripePreviewVersion) pin this one. Pinned so
# that an account's default version cannot change the shape of the answers checked below.
STRIPE_PREVIEW_VERSION = "2026-07-29.preview"

# Where the token goes in the create call. The seller docs and both SDKs use the top-level
# parameter; the 2026-04-22.preview changelog nests it in payment_method_data. Preview parameter
# names have drifted, hence a setting rather than a guess.
SptPlacement = Literal["top_level", "payment_method_data"]

CHALLENGE_METADATA_KEY = "mpp_challenge_id"  # the same key pympp writes
REFERENCE_METADATA_KEY = "farebox_reference"  # the invoice reference of the X-Receipt pattern

# Checked before an id goes into a URL path: a receipt is attacker input.
_PAYMENT_INTENT_ID = re.compile(r"pi_[A-Za-z0-9]{8,250}")
_CURRENCY = re.compile(r"[A-Za-z]{3}")
_METADATA_MAX_KEYS = 50  # Stripe's documented metadata limits (as pympp's validate_metadata)
_METADATA_MAX_KEY = 40
_METADATA_MAX_VALUE = 500


def stripe_client(
    secret_key: str, *, api_base: str | None = None
) -> tuple[stripe.StripeClient, stripe.HTTPXClient]:
    """A ``StripeClient`` fit for farebox, and its HTTP client (close it with
    ``await http_client.close_async()``).

    httpx-based, so async calls never block the event loop, and with no automatic retries (see
    :meth:`StripeLedger._options` for why). ``api_base`` points it at another Stripe-compatible
    API (localstripe, :mod:`farebox.dev.devstripe`).
    """
    http_client = stripe.HTTPXClient()
    options: dict[str, Any] = {"max_network_retries": 0, "http_client": http_client}
    if api_base is not None:
        options["base_addresses"] = {"api": api_base}
    return stripe.StripeClient(secret_key, **options), http_client


def idempotency_key_for(challenge_id: str, spt: str) -> str:
    """The ``Idempotency-Key`` of the charge for one challenge paid with one token.

    ``"farebox_" + sha256(challenge_id + NUL + spt)`` in hex. pympp uses ``mpp_{id}_{spt}``; a hash
    keeps the token out of Stripe's request logs and dashboard (where keys are shown), has a fixed
    length well under Stripe's 255-character limit, and the NUL separator cannot occur in either
    part, so two different pairs never share a key. Deterministic, so a retry of the same
    (challenge, token) is recognised by Stripe as the same charge and never charges twice.
    """
    digest = hashlib.sha256(challenge_id.encode() + b"\x00" + spt.encode()).hexdigest()
    return "farebox_" + digest


@dataclass(frozen=True, slots=True)
class CardCharge:
    """A succeeded card payment: a PaymentIntent and its charge.

    ``replayed`` is true when Stripe answered a create call from its idempotency store
    (``Idempotent-Replayed: true``): this exact (challenge, token) was charged by an earlier call.
    The money moved once; whether to serve again is the caller's decision (see
    :meth:`StripeLedger.charge`).
    """

    payment_intent: str
    amount: int
    currency: str
    status: str
    replayed: bool
    charge: str | None


@dataclass(frozen=True, slots=True)
class InvoicePayment:
    """A PaymentIntent the server created for an invoice, waiting for the payer.

    ``client_secret`` lets the payer confirm it (Stripe.js, or the confirm API with the merchant's
    publishable key); it pays this PaymentIntent and nothing else.
    """

    payment_intent: str
    client_secret: str
    amount: int
    currency: str


@dataclass(frozen=True, slots=True)
class CardRefund:
    """A refund created through Stripe's Refunds API."""

    refund: str
    payment_intent: str
    amount: int
    currency: str
    status: str


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    # The HTTP client decides the mapping type; do not rely on it being case-insensitive.
    if headers is None:
        return None
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _check_metadata(metadata: Mapping[str, str]) -> None:
    if len(metadata) > _METADATA_MAX_KEYS:
        raise ConfigError(f"Stripe metadata has at most {_METADATA_MAX_KEYS} keys")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError("Stripe metadata keys and values must be strings")
        if not key or len(key) > _METADATA_MAX_KEY or "[" in key or "]" in key:
            raise ConfigError(f"invalid Stripe metadata key {key[:50]!r}")
        if len(value) > _METADATA_MAX_VALUE:
            raise ConfigError(f"Stripe metadata value for {key!r} is too long")


def _check_payment_intent_id(value: object) -> None:
    # Before the id goes into a URL path: it comes from the payer (a receipt) or an operator.
    if not isinstance(value, str) or not _PAYMENT_INTENT_ID.fullmatch(value):
        raise PaymentError("invalid_payload", "not a PaymentIntent id")


def _check_amount(amount: int, currency: str) -> str:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        raise ConfigError("amount must be a positive integer in minor units")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise ConfigError("currency must be a three-letter ISO 4217 code")
    return currency.lower()  # Stripe answers in lower case


def _unavailable(exc: stripe.StripeError, doing: str) -> PaymentError:
    # Only the class name and the HTTP status: Stripe's message can quote the (redacted) key.
    status = f" (HTTP {exc.http_status})" if exc.http_status else ""
    return PaymentError(
        "ledger_unavailable", f"Stripe {doing} failed: {type(exc).__name__}{status}"
    )


def _stripe_code(exc: stripe.StripeError) -> str:
    return exc.code if isinstance(exc.code, str) and exc.code.isidentifier() else "unknown"


class StripeLedger:
    """Charges Shared Payment Tokens and checks card receipts with one Stripe account.

    ``client`` holds the secret key (it never leaves it); ``stripe_version`` is sent with every
    request; ``spt_parameter`` chooses where the token goes (see :data:`SptPlacement`);
    ``payment_method_types`` is sent as ``payment_method_types[]`` (pympp's choice, ``card``).
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        *,
        stripe_version: str = STRIPE_PREVIEW_VERSION,
        spt_parameter: SptPlacement = "top_level",
        payment_method_types: Sequence[str] = ("card",),
    ) -> None:
        if spt_parameter not in ("top_level", "payment_method_data"):
            raise ConfigError(f"unknown spt_parameter {spt_parameter!r}")
        if isinstance(payment_method_types, str) or not payment_method_types:
            raise ConfigError("payment_method_types must be a non-empty sequence of names")
        self.client = client
        self.stripe_version = stripe_version
        self.spt_parameter = spt_parameter
        self.payment_method_types = tuple(payment_method_types)

    def _options(self, idempotency_key: str | None = None) -> stripe.RequestOptions:
        options: stripe.RequestOptions = {
            "stripe_version": self.stripe_version,
            # No automatic retries (as pympp): a retry of a create whose first answer was lost comes
            # back "Idempotent-Replayed", which would then be indistinguishable from an agent
            # presenting the same credential twice. A lost answer becomes ledger_unavailable and
            # the caller decides whether to retry.
            "max_network_retries": 0,
        }
        if idempotency_key is not None:
            options["idempotency_key"] = idempotency_key
        return options

    # --- MPP: charge a Shared Payment Token ---------------------------------------------------

    async def charge(
        self,
        *,
        spt: str,
        amount: int,
        currency: str,
        challenge_id: str,
        metadata: Mapping[str, str],
    ) -> CardCharge:
        """Create and confirm a PaymentIntent paid with ``spt``; return it once it has succeeded.

        ``amount`` is in minor units. ``metadata`` is written on the PaymentIntent together with
        ``mpp_challenge_id``. The ``Idempotency-Key`` is :func:`idempotency_key_for` the challenge
        and the token, so the same credential can never be charged twice, even by two servers.

        A replay (``CardCharge.replayed``) means Stripe had already charged this (challenge,
        token): the payer paid once. The challenge id's single use is the caller's to enforce:
        if it already served this challenge it must refuse (``proof_replayed``) or return the stored
        answer; if the earlier attempt never got to serve (its answer from Stripe was lost, or the
        process died), serving now is right, since the money has moved.

        Raises :class:`PaymentError`: ``invalid_payload`` (malformed token),
        ``card_declined``, ``card_action_required`` (3-D Secure: answer a new 402),
        ``card_token_invalid`` (unknown, expired, used or revoked token), ``card_payment_failed``
        (any other status, or an answer that does not match what was asked),
        ``idempotency_conflict`` (the same challenge and token with other parameters) and
        ``ledger_unavailable`` (network, authentication, rate limit, Stripe errors, a request
        Stripe refuses as malformed, such as a token placement this API version does not know).
        """
        currency = _check_amount(amount, currency)
        if not mpp.is_spt(spt):
            raise PaymentError("invalid_payload", "not a Shared Payment Token")
        if not challenge_id:
            raise ConfigError("challenge_id is required")
        if CHALLENGE_METADATA_KEY in metadata and metadata[CHALLENGE_METADATA_KEY] != challenge_id:
            raise ConfigError(f"metadata {CHALLENGE_METADATA_KEY!r} differs from the challenge id")
        tagged = {**metadata, CHALLENGE_METADATA_KEY: challenge_id}
        _check_metadata(tagged)

        params: dict[str, Any] = {
            "amount": amount,
            "currency": currency,
            "confirm": True,
            "payment_method_types": list(self.payment_method_types),
            "metadata": tagged,
        }
        if self.spt_parameter == "top_level":
            params["shared_payment_granted_token"] = spt
        else:
            params["payment_method_data"] = {"shared_payment_granted_token": spt}
        try:
            # The typed params predate Shared Payment Tokens (a preview field): cast, not ignore.
            intent = await self.client.v1.payment_intents.create_async(
                cast("PaymentIntentCreateParams", params),
                self._options(idempotency_key_for(challenge_id, spt)),
            )
        except stripe.CardError as exc:
            decline = exc.error.decline_code if exc.error is not None else None
            detail = _stripe_code(exc) + (f"/{decline}" if isinstance(decline, str) else "")
            raise PaymentError("card_declined", f"the card was declined ({detail})") from None
        except stripe.IdempotencyError:
            raise PaymentError(
                "idempotency_conflict", "this challenge and token were charged with other terms"
            ) from None
        except stripe.InvalidRequestError as exc:
            param = exc.param or ""
            if "shared_payment_granted_token" in param and exc.code != "parameter_unknown":
                raise PaymentError(
                    "card_token_invalid", f"Stripe refused the token ({_stripe_code(exc)})"
                ) from None
            raise _unavailable(exc, "payment") from None
        except stripe.StripeError as exc:
            raise _unavailable(exc, "payment") from None

        replayed = _header(getattr(intent.last_response, "headers", None), "Idempotent-Replayed")
        status = intent.status
        if status == "requires_action":
            raise PaymentError("card_action_required", "the card needs the payer's authentication")
        if status != "succeeded":
            raise PaymentError("card_payment_failed", f"PaymentIntent status is {status}")
        # Stripe enforces the token's limits, but farebox serves on what it checks itself.
        found_metadata = intent.metadata.to_dict() if intent.metadata is not None else {}
        if (
            intent.amount != amount
            or intent.currency != currency
            or found_metadata.get(CHALLENGE_METADATA_KEY) != challenge_id
            or not str(intent.id).startswith("pi_")
        ):
            raise PaymentError("card_payment_failed", "the PaymentIntent differs from the request")
        received = _field(intent, "amount_received")
        if received is not None and received != amount:
            raise PaymentError("card_payment_failed", "the amount received differs")
        return CardCharge(
            payment_intent=intent.id,
            amount=intent.amount,
            currency=intent.currency,
            status=status,
            replayed=replayed is not None and replayed.strip().lower() == "true",
            charge=_charge_id(intent.latest_charge),
        )

    # --- X-Receipt: an invoice's PaymentIntent, and checking it when presented ------------------

    async def create_invoice_payment(
        self,
        *,
        amount: int,
        currency: str,
        reference: str,
        metadata: Mapping[str, str] | None = None,
    ) -> InvoicePayment:
        """Create the (unconfirmed) PaymentIntent that pays invoice ``reference``.

        The reference goes into ``metadata`` under ``farebox_reference``: only the holder of this
        account's secret key can write it, so a PaymentIntent carrying it was made here for that
        invoice. The ``Idempotency-Key`` is derived from the reference, so a retried creation
        never makes a second PaymentIntent for one invoice. Raises :class:`PaymentError`
        ``ledger_unavailable`` when Stripe cannot be reached or refuses.
        """
        currency = _check_amount(amount, currency)
        if not reference or len(reference) > _METADATA_MAX_VALUE:
            raise ConfigError("an invoice reference is 1 to 500 characters")
        tagged = {**(metadata or {}), REFERENCE_METADATA_KEY: reference}
        _check_metadata(tagged)
        params: dict[str, Any] = {
            "amount": amount,
            "currency": currency,
            "payment_method_types": list(self.payment_method_types),
            "metadata": tagged,
        }
        key = "farebox_invoice_" + hashlib.sha256(reference.encode()).hexdigest()
        try:
            intent = await self.client.v1.payment_intents.create_async(
                cast("PaymentIntentCreateParams", params), self._options(key)
            )
        except stripe.StripeError as exc:
            raise _unavailable(exc, "invoice") from None
        secret = intent.client_secret
        if (
            not str(intent.id).startswith("pi_")
            or not isinstance(secret, str)
            or intent.amount != amount
            or intent.currency != currency
        ):
            raise PaymentError("ledger_unavailable", "Stripe answered an unexpected PaymentIntent")
        return InvoicePayment(intent.id, secret, intent.amount, intent.currency)

    async def retrieve_paid(
        self,
        payment_intent_id: str,
        *,
        amount: int,
        currency: str,
        reference: str,
        client_secret: str | None = None,
    ) -> CardCharge:
        """The PaymentIntent ``payment_intent_id`` if it pays ``amount`` ``currency`` for ``reference``.

        Requires ``status == "succeeded"``, the exact amount and currency, ``metadata`` key
        ``farebox_reference`` equal to ``reference`` (metadata only the merchant's key can write),
        a paid, captured charge of the same amount, and nothing refunded or disputed.
        ``amount_received`` is checked when present (real Stripe; localstripe lacks it).
        With ``client_secret`` the PaymentIntent's own client secret must equal it (proof that the
        presenter holds what only the invoice's recipient was given, not just the public id).
        Single use of the PaymentIntent and the reference is the caller's (its store's) job.

        Raises :class:`PaymentError`: ``invalid_payload`` (not a PaymentIntent id),
        ``card_payment_not_found`` (unknown here: another account, mode or a made-up id),
        ``card_payment_failed`` (not succeeded), ``card_payment_mismatch`` (amount, currency or
        reference differ), ``card_payment_refunded`` and ``ledger_unavailable``.
        """
        currency = _check_amount(amount, currency)
        _check_payment_intent_id(payment_intent_id)
        try:
            intent = await self.client.v1.payment_intents.retrieve_async(
                payment_intent_id, {"expand": ["latest_charge"]}, self._options()
            )
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise PaymentError("card_payment_not_found", "no such PaymentIntent") from None
            raise _unavailable(exc, "lookup") from None
        except stripe.StripeError as exc:
            raise _unavailable(exc, "lookup") from None

        if intent.id != payment_intent_id:
            raise PaymentError("card_payment_not_found", "Stripe answered another PaymentIntent")
        if client_secret is not None:
            found_secret = _field(intent, "client_secret")
            if not isinstance(found_secret, str) or not hmac.compare_digest(
                found_secret.encode(), client_secret.encode()
            ):
                raise PaymentError("card_payment_mismatch", "the client secret does not match")
        if intent.status != "succeeded":
            raise PaymentError("card_payment_failed", f"PaymentIntent status is {intent.status}")
        found_metadata = intent.metadata.to_dict() if intent.metadata is not None else {}
        if (
            intent.amount != amount
            or intent.currency != currency
            or found_metadata.get(REFERENCE_METADATA_KEY) != reference
        ):
            raise PaymentError("card_payment_mismatch", "the PaymentIntent pays for something else")
        received = _field(intent, "amount_received")
        if received is not None and received < amount:
            raise PaymentError("card_payment_mismatch", "less was received than the price")

        charge = intent.latest_charge
        if isinstance(charge, str):  # not expanded after all: ask for it
            try:
                charge = await self.client.v1.charges.retrieve_async(charge, None, self._options())
            except stripe.StripeError as exc:
                raise _unavailable(exc, "lookup") from None
        if charge is None:
            raise PaymentError("card_payment_failed", "the PaymentIntent has no charge")
        if (
            _field(charge, "amount") != amount
            or _field(charge, "paid") is not True
            or _field(charge, "status") != "succeeded"
        ):
            raise PaymentError("card_payment_failed", "the charge did not pay the amount")
        if (
            _field(charge, "refunded")
            or _field(charge, "amount_refunded")
            or _field(charge, "disputed")
        ):
            raise PaymentError("card_payment_refunded", "the payment was refunded or disputed")
        return CardCharge(
            payment_intent=intent.id,
            amount=intent.amount,
            currency=intent.currency,
            status=intent.status,
            replayed=False,
            charge=charge.id,
        )

    # --- refunds --------------------------------------------------------------------------------

    async def refund(
        self,
        payment_intent_id: str,
        amount: int | None = None,
        *,
        idempotency_key: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> CardRefund:
        """Refund ``amount`` (minor units; everything left when ``None``) of a PaymentIntent.

        Pass an ``idempotency_key`` that names this refund (an operator's action id, say) so a
        retried refund never pays back twice; without one the library adds a random key, which
        protects nothing across retries. Raises :class:`PaymentError`: ``invalid_payload``,
        ``card_payment_not_found``, ``refund_refused`` (already refunded, more than what is left,
        a failed payment) and ``ledger_unavailable``.
        """
        _check_payment_intent_id(payment_intent_id)
        params: dict[str, Any] = {"payment_intent": payment_intent_id}
        if amount is not None:
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
                raise ConfigError("amount must be a positive integer in minor units")
            params["amount"] = amount
        if metadata:
            _check_metadata(metadata)
            params["metadata"] = dict(metadata)
        try:
            refund = await self.client.v1.refunds.create_async(
                cast("RefundCreateParams", params), self._options(idempotency_key)
            )
        except stripe.IdempotencyError:
            raise PaymentError(
                "idempotency_conflict", "this refund key was used for another refund"
            ) from None
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404 or (
                exc.code == "resource_missing" and exc.param == "payment_intent"
            ):
                raise PaymentError("card_payment_not_found", "no such PaymentIntent") from None
            if exc.http_status == 400:
                raise PaymentError(
                    "refund_refused", f"Stripe refused the refund ({_stripe_code(exc)})"
                ) from None
            raise _unavailable(exc, "refund") from None
        except stripe.StripeError as exc:
            raise _unavailable(exc, "refund") from None
        return CardRefund(
            refund=refund.id,
            payment_intent=payment_intent_id,
            amount=refund.amount,
            currency=refund.currency,
            status=str(refund.status),
        )


def _field(obj: stripe.StripeObject, name: str) -> Any:
    """A field that may be absent (localstripe omits some; StripeObject 16.x has no ``get``)."""
    return obj[name] if name in obj else None  # noqa: SIM401 (no .get on StripeObject)


def _charge_id(latest: Any) -> str | None:
    if isinstance(latest, str):
        return latest
    found = getattr(latest, "id", None)
    return found if isinstance(found, str) else None
