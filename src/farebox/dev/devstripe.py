"""A STAND-IN for a small part of Stripe's API: card payments with no Stripe account and no network.

This is not Stripe, and not a mock generated from Stripe's OpenAPI description: it is a fake written
by hand to follow Stripe's public documentation, for ``farebox demo``, ``farebox devstripe`` (try
the card rail locally: point ``[card] api_base`` at it) and farebox's own tests (where it is the
documented-API fake of Stripe: the real API cannot be reached from the test machines, and
localstripe has no Shared Payment Tokens, no ``Idempotency-Key`` replay, no refusal of over-refunds
and no ``amount_received``). It keeps everything in memory and moves no money. The pages it follows
(docs.stripe.com):

* "Create a PaymentIntent" (API reference, ``POST /v1/payment_intents``) and "The PaymentIntent
  object": ``amount``, ``currency``, ``confirm``, ``metadata[...]``, ``payment_method_types[]``,
  ``amount_received``, ``latest_charge`` (an id unless expanded), ``status``.
* "Shared payment tokens" (agentic commerce, seller side) and the "SharedPaymentGrantedToken"
  object (2026-04-22.preview): the token is given as top-level ``shared_payment_granted_token``;
  the 2026-04-22.preview changelog places it at ``payment_method_data[shared_payment_granted_token]``.
  Both placements are accepted unless the fake is told to accept only one. Tokens are single use
  (``deactivated_reason`` ``consumed``) and can expire (``expired``).
* "Idempotent requests": a result is saved per ``Idempotency-Key``; the same key with the same
  parameters gets the saved status and body again with ``Idempotent-Replayed: true``; the same key
  with other parameters is a 400 ``idempotency_error``.
* "Errors" and "Error codes": ``card_error`` (402, ``card_declined`` with a ``decline_code``),
  ``invalid_request_error`` (400/404: ``resource_missing``, ``parameter_unknown``,
  ``charge_already_refunded``, ``amount_too_large``), ``idempotency_error``.
* "Create a refund" (``POST /v1/refunds``): refuses a refund of a fully refunded charge and one
  larger than what is left unrefunded.
* "Versioning": the ``Stripe-Version`` header (recorded, not interpreted).
* "Confirm a PaymentIntent" (``POST /v1/payment_intents/{id}/confirm``, ``payment_method``) and
  "The PaymentIntent object" ``client_secret``: a PaymentIntent created without ``confirm`` (an
  X-Receipt invoice's) is paid by confirming it with a test PaymentMethod, with the account's
  secret key, or with its publishable key (``publishable_key``) and the ``client_secret``, as
  Stripe.js does in a payer's browser.
* "Create a SharedPaymentIssuedToken" (``POST /v1/shared_payment/issued_tokens``, the agent's
  side; changelog "dahlia/2026-04-22/shared-payment-issued-token") and "The
  SharedPaymentIssuedToken object": ``payment_method``, ``usage_limits[currency|max_amount|
  expires_at]``, ``seller_details[network_business_profile|external_id]``, ``shared_metadata[...]``;
  the answer has ``id`` (``spt_…``), ``object`` ``shared_payment.issued_token``, ``usage_limits``,
  ``seller_details``, ``created``, ``livemode``, ``deactivated_at``, ``deactivated_reason``.
  The seller redeems the same ``spt_…`` as its granted token; Stripe enforces the usage limits
  (currency, ``max_amount``, ``expires_at``), the seller it was issued for and single use.

Accounts: the seller's key (``api_key``, whose Stripe profile is ``profile``, the MPP
``networkId``) and agent keys (``agent_keys``: key -> profile). Every key may call every endpoint;
objects are visible only to the account that made them, and idempotency keys are per account (as
Stripe scopes them).

Choices the documentation does not make, made here in Stripe's documented error shapes: minting
with an unknown ``payment_method`` is a 400 ``resource_missing`` on ``payment_method``; minting with
an expiry not in the future, or a ``max_amount`` below 1, is a 400 ``parameter_invalid_integer``;
redeeming a token issued for another seller is a 400 ``resource_missing`` on the token parameter
(the token does not exist for that seller); an amount over ``max_amount``, another currency or a
passed ``expires_at`` is a 400 ``shared_payment_granted_token_usage_limits_exceeded`` /
``…_expired`` on the token parameter. Test payment methods for minting (Stripe's documented test
PaymentMethods decide how the charge made with the token ends): ``pm_card_visa`` (and any other
``pm_card_…`` not below) succeeds; ``pm_card_chargeDeclined`` and ``pm_card_visa_chargeDeclined``
decline (``card_declined``/``generic_decline``); ``pm_card_chargeDeclinedInsufficientFunds``
declines with ``insufficient_funds``; ``pm_card_authenticationRequired`` leaves the PaymentIntent
``requires_action``.

Where the documentation does not say what Stripe answers (the exact error for an expired or consumed
token), the fake makes a documented-shaped choice and says so next to it. Test tokens (any suffix
after the name makes a distinct token, e.g. ``spt_succeeds_2``):

==========================  ======================================================================
``spt_succeeds``            the PaymentIntent succeeds
``spt_declines``            402 ``card_error`` / ``card_declined`` (``generic_decline``)
``spt_insufficient_funds``  402 ``card_error`` / ``card_declined`` (``insufficient_funds``)
``spt_requires_action``     200, PaymentIntent ``requires_action`` (3-D Secure needed)
``spt_expired``             400 ``invalid_request_error`` on the token parameter (expired)
anything else               400 ``invalid_request_error`` / ``resource_missing`` on the token
==========================  ======================================================================

Every request is recorded (method, path, headers, query and form fields, in order) so tests can
check farebox's wire requests field by field. The server is a standard-library
``ThreadingHTTPServer`` bound to 127.0.0.1 only, on a port the kernel picks.
"""

from __future__ import annotations

import itertools
import json
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "AGENT_KEY",
    "SELLER_PROFILE",
    "DevStripe",
    "Placement",
    "RecordedRequest",
    "running_devstripe",
]

Placement = Literal["top_level", "payment_method_data", "both"]

SPT_TOP_LEVEL = "shared_payment_granted_token"
SPT_NESTED = "payment_method_data[shared_payment_granted_token]"
# The PaymentIntent parameters the fake understands; any other is a 400 parameter_unknown, as on
# Stripe ("Received unknown parameter: …").
_KNOWN_SCALARS = {"amount", "currency", "confirm", SPT_TOP_LEVEL, SPT_NESTED}
_KNOWN_PREFIXES = ("metadata[", "payment_method_types[", "expand[")
ISSUED_TOKENS = "/v1/shared_payment/issued_tokens"
_ISSUE_SCALARS = {
    "payment_method",
    "usage_limits[currency]",
    "usage_limits[max_amount]",
    "usage_limits[expires_at]",
    "seller_details[network_business_profile]",
    "seller_details[external_id]",
    "setup_future_usage",
}
_ISSUE_PREFIXES = ("shared_metadata[", "expand[")
SELLER_PROFILE = "profile_fake_seller"
_PUBLISHABLE = "publishable:"
AGENT_KEY = "sk_test_farebox_fake_agent"
# What a charge made with a token minted from these test PaymentMethods does (Stripe's documented
# test cards); any other pm_card_… succeeds, anything else is unknown.
_PM_OUTCOMES = {
    "pm_card_chargeDeclined": "declines",
    "pm_card_visa_chargeDeclined": "declines",
    "pm_card_chargeDeclinedInsufficientFunds": "insufficient_funds",
    "pm_card_authenticationRequired": "requires_action",
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it. Header names are lower-cased."""

    method: str
    path: str
    headers: Mapping[str, str]
    query: tuple[tuple[str, str], ...]
    form: tuple[tuple[str, str], ...]

    @property
    def fields(self) -> dict[str, str]:
        """The form fields as a dict (Stripe's encoding never repeats a name)."""
        return dict(self.form)


class _StripeError(Exception):
    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.status = status
        self.error = error


def _invalid(message: str, *, status: int = 400, **extra: Any) -> _StripeError:
    return _StripeError(status, {"type": "invalid_request_error", "message": message, **extra})


@dataclass
class DevStripe:
    """The stand-in's state; serve it with :func:`running_devstripe`."""

    api_key: str = "sk_test_farebox_fake"
    publishable_key: str = "pk_test_farebox_fake"
    keep_requests: bool = True  # a long-running stand-in keeps no request log
    placement: Placement = "both"
    profile: str = SELLER_PROFILE
    agent_keys: Mapping[str, str] = field(default_factory=lambda: {AGENT_KEY: "profile_fake_agent"})
    requests: list[RecordedRequest] = field(default_factory=list)
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    consumed_tokens: set[str] = field(default_factory=set)
    # Minted tokens by id, with the profile of the agent account that issued them.
    issued_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (account profile, Idempotency-Key) -> (the request's parameters, saved status, saved body).
    idempotency: dict[tuple[str, str], tuple[tuple[tuple[str, str], ...], int, dict[str, Any]]] = (
        field(default_factory=dict)
    )
    # Which account (profile) made each PaymentIntent: objects are private to their account.
    owners: dict[str, str] = field(default_factory=dict)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def _id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._ids):06d}{secrets.token_hex(4)}"

    def posts(self, path: str) -> list[RecordedRequest]:
        """The recorded POSTs to ``path``, oldest first."""
        return [r for r in self.requests if r.method == "POST" and r.path == path]

    def _account(self, authorization: str | None) -> str | None:
        # The profile of the account whose key authenticates the request.
        if authorization is None or not authorization.startswith("Bearer "):
            return None
        key = authorization[len("Bearer ") :]
        if key == self.api_key:
            return self.profile
        if key == self.publishable_key:
            return _PUBLISHABLE + self.profile  # may only confirm (see _route)
        return self.agent_keys.get(key)

    # --- dispatch ---------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        query: tuple[tuple[str, str], ...],
        form: tuple[tuple[str, str], ...],
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Answer one request: (status, extra headers, JSON body)."""
        with self._lock:  # one request at a time: the state is small and tests are short
            if self.keep_requests:
                self.requests.append(RecordedRequest(method, path, dict(headers), query, form))
            account = self._account(headers.get("authorization"))
            if account is None:
                return 401, {}, _error_body(_invalid("Invalid API Key provided.", status=401))
            key = headers.get("idempotency-key")
            if method == "POST" and key is not None:
                saved = self.idempotency.get((account, key))
                if saved is not None:
                    params, status, body = saved
                    if params != tuple(sorted(form)):
                        error = {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only be used with the "
                            "same parameters they were first used with.",
                        }
                        return 400, {}, {"error": error}
                    return status, {"Idempotent-Replayed": "true"}, body
            try:
                status, body = self._route(account, method, path, query, form)
            except _StripeError as exc:
                status, body = exc.status, _error_body(exc)
                # "Idempotent requests": results are saved once the endpoint started executing,
                # declines included, not when parameters failed validation.
                saves = status == 402
            else:
                saves = True
            if method == "POST" and key is not None and saves:
                self.idempotency[(account, key)] = (tuple(sorted(form)), status, body)
            return status, {}, body

    def _route(
        self,
        account: str,
        method: str,
        path: str,
        query: tuple[tuple[str, str], ...],
        form: tuple[tuple[str, str], ...],
    ) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if account.startswith(_PUBLISHABLE) and not (
            method == "POST" and len(parts) == 4 and parts[3] == "confirm"
        ):
            raise _invalid("This API call cannot be made with a publishable API key.", status=401)
        if method == "POST" and path == ISSUED_TOKENS:
            return 200, self._issue_token(account, dict(form))
        if method == "POST" and parts == ["v1", "payment_intents"]:
            return 200, self._create_intent(account, dict(form))
        if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "payment_intents"]:
            intent = self.intents.get(parts[2])
            if intent is None or self.owners.get(parts[2]) != account:
                raise _invalid(
                    f"No such payment_intent: '{parts[2]}'",
                    status=404,
                    code="resource_missing",
                    param="intent",
                )
            return 200, self._render_intent(intent, expand={v for _, v in query})
        if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "charges"]:
            charge = self.charges.get(parts[2])
            if charge is None or self.owners.get(charge["payment_intent"]) != account:
                raise _invalid(f"No such charge: '{parts[2]}'", status=404, code="resource_missing")
            return 200, dict(charge)
        if method == "POST" and parts == ["v1", "refunds"]:
            return 200, self._create_refund(account, dict(form))
        if (
            method == "POST"
            and len(parts) == 4
            and parts[:2] == ["v1", "payment_intents"]
            and parts[3] == "confirm"
        ):
            return 200, self._confirm_intent(account, parts[2], dict(form))
        raise _invalid(f"Unrecognized request URL ({method}: {path}).", status=404)

    # --- Shared Payment Tokens, the agent's side ----------------------------------------------

    def _issue_token(self, account: str, form: dict[str, str]) -> dict[str, Any]:
        for name in form:
            if name not in _ISSUE_SCALARS and not name.startswith(_ISSUE_PREFIXES):
                raise _invalid(
                    f"Received unknown parameter: {name}", code="parameter_unknown", param=name
                )
        for name in (
            "payment_method",
            "usage_limits[currency]",
            "usage_limits[max_amount]",
            "usage_limits[expires_at]",
            "seller_details[network_business_profile]",
        ):
            if not form.get(name):
                raise _invalid(
                    f"Missing required param: {name}.", code="parameter_missing", param=name
                )
        payment_method = form["payment_method"]
        if not payment_method.startswith("pm_card_"):
            raise _invalid(
                f"No such PaymentMethod: '{payment_method}'",
                code="resource_missing",
                param="payment_method",
            )
        currency = form["usage_limits[currency]"]
        if len(currency) != 3 or not currency.isalpha():
            raise _invalid(
                "Invalid currency", code="parameter_invalid_string", param="usage_limits[currency]"
            )
        numbers: dict[str, int] = {}
        for name in ("usage_limits[max_amount]", "usage_limits[expires_at]"):
            text = form[name]
            if not text.isdigit() or int(text) < 1:
                raise _invalid(
                    f"Invalid integer: {text}", code="parameter_invalid_integer", param=name
                )
            numbers[name] = int(text)
        now = int(time.time())
        if numbers["usage_limits[expires_at]"] <= now:
            raise _invalid(
                "usage_limits[expires_at] must be in the future.",
                code="parameter_invalid_integer",
                param="usage_limits[expires_at]",
            )
        seller: dict[str, Any] = {
            "network_business_profile": form["seller_details[network_business_profile]"],
            "external_id": form.get("seller_details[external_id]"),
        }
        token: dict[str, Any] = {
            "id": self._id("spt"),
            "object": "shared_payment.issued_token",
            "created": now,
            "deactivated_at": None,
            "deactivated_reason": None,
            "livemode": False,
            "payment_method": payment_method,
            "seller_details": seller,
            "shared_metadata": {
                k[len("shared_metadata[") : -1]: v
                for k, v in form.items()
                if k.startswith("shared_metadata[")
            },
            "usage_limits": {
                "currency": currency.lower(),
                "max_amount": numbers["usage_limits[max_amount]"],
                "expires_at": numbers["usage_limits[expires_at]"],
            },
        }
        self.issued_tokens[token["id"]] = {**token, "_issuer": account}
        return token

    def _redeem_issued(
        self, account: str, intent: dict[str, Any], token: str, param: str
    ) -> str | None:
        """The outcome kind for a minted token, after Stripe's checks of its limits; ``None`` if
        ``token`` was not minted here."""
        issued = self.issued_tokens.get(token)
        if issued is None:
            return None
        if issued["seller_details"]["network_business_profile"] != account:
            # The token exists only for the seller it was issued to.
            raise _invalid(
                f"No such shared_payment_granted_token: '{token}'",
                code="resource_missing",
                param=param,
            )
        if token in self.consumed_tokens:
            return "consumed"
        limits = issued["usage_limits"]
        if limits["expires_at"] <= int(time.time()):
            return "expired"
        if intent["currency"] != limits["currency"] or intent["amount"] > limits["max_amount"]:
            raise _invalid(
                "The PaymentIntent exceeds the SharedPaymentGrantedToken's usage limits.",
                code="shared_payment_granted_token_usage_limits_exceeded",
                param=param,
            )
        pm = issued["payment_method"]
        return _PM_OUTCOMES.get(pm, "succeeds")

    # --- PaymentIntents -----------------------------------------------------------------------

    def _create_intent(self, account: str, form: dict[str, str]) -> dict[str, Any]:
        for name in form:
            if name not in _KNOWN_SCALARS and not name.startswith(_KNOWN_PREFIXES):
                raise _invalid(
                    f"Received unknown parameter: {name}", code="parameter_unknown", param=name
                )
        allowed = {
            "top_level": (SPT_TOP_LEVEL,),
            "payment_method_data": (SPT_NESTED,),
            "both": (SPT_TOP_LEVEL, SPT_NESTED),
        }[self.placement]
        for name in (SPT_TOP_LEVEL, SPT_NESTED):
            if name in form and name not in allowed:
                raise _invalid(
                    f"Received unknown parameter: {name}", code="parameter_unknown", param=name
                )
        amount_text = form.get("amount", "")
        if not amount_text.isdigit() or int(amount_text) < 1:
            raise _invalid("Invalid integer: amount", code="parameter_invalid_integer")
        currency = form.get("currency", "")
        if len(currency) != 3 or not currency.isalpha():
            raise _invalid("Invalid currency", code="parameter_invalid_string", param="currency")
        token_param = SPT_NESTED if SPT_NESTED in form else SPT_TOP_LEVEL
        token = form.get(token_param)
        intent_id = self._id("pi")
        intent: dict[str, Any] = {
            "id": intent_id,
            "object": "payment_intent",
            "client_secret": f"{intent_id}_secret_{secrets.token_hex(12)}",
            "amount": int(amount_text),
            "amount_received": 0,
            "currency": currency.lower(),
            "capture_method": "automatic_async",
            "created": int(time.time()),
            "livemode": False,
            "metadata": {
                k[len("metadata[") : -1]: v for k, v in form.items() if k.startswith("metadata[")
            },
            "payment_method_types": [
                v for k, v in form.items() if k.startswith("payment_method_types[")
            ]
            or ["card"],
            "payment_method": None,
            "latest_charge": None,
            "last_payment_error": None,
            "status": "requires_payment_method",
        }
        if form.get("confirm") == "true":
            if token is None:
                raise _invalid(
                    "You must provide a payment method to confirm.",
                    code="payment_intent_unexpected_state",
                )
            self.owners[intent["id"]] = account
            self._confirm(account, intent, token, token_param)
        self.intents[intent["id"]] = intent
        self.owners[intent["id"]] = account
        return self._render_intent(intent, expand=set())

    def _confirm_intent(self, account: str, intent_id: str, form: dict[str, str]) -> dict[str, Any]:
        """``POST /v1/payment_intents/{id}/confirm`` with a test ``payment_method``."""
        intent = self.intents.get(intent_id)
        if intent is None or self.owners.get(intent_id) != account.removeprefix(_PUBLISHABLE):
            raise _invalid(
                f"No such payment_intent: '{intent_id}'", status=404, code="resource_missing"
            )
        if (
            account.startswith(_PUBLISHABLE)
            and form.get("client_secret") != intent["client_secret"]
        ):
            # A publishable key may only confirm with the PaymentIntent's client secret.
            raise _invalid(
                "The client_secret provided does not match any associated PaymentIntent on this "
                "account.",
                code="payment_intent_invalid_parameter",
                param="client_secret",
            )
        for name in form:
            if name not in ("payment_method", "client_secret", "expand[0]"):
                raise _invalid(
                    f"Received unknown parameter: {name}", code="parameter_unknown", param=name
                )
        if intent["status"] not in ("requires_payment_method", "requires_confirmation"):
            raise _invalid(
                f"This PaymentIntent's status is {intent['status']}: it cannot be confirmed.",
                code="payment_intent_unexpected_state",
            )
        payment_method = form.get("payment_method", "")
        if not payment_method.startswith("pm_card_"):
            raise _invalid(
                f"No such PaymentMethod: '{payment_method}'",
                code="resource_missing",
                param="payment_method",
            )
        intent["payment_method"] = payment_method
        self._outcome(intent, _PM_OUTCOMES.get(payment_method, "succeeds"))
        return self._render_intent(intent, expand=set())

    def _confirm(self, account: str, intent: dict[str, Any], token: str, param: str) -> None:
        kind = self._redeem_issued(account, intent, token, param)
        if kind == "consumed":
            kind = "succeeds"  # consumed tokens are refused just below
        if kind is None:
            kind = _token_kind(token)
        if kind is None:
            raise _invalid(
                f"No such shared_payment_granted_token: '{token}'",
                code="resource_missing",
                param=param,
            )
        if token in self.consumed_tokens or kind == "expired":
            # Not documented verbatim: the token object's deactivated_reason is "consumed" or
            # "expired"; the fake answers with the documented error shape on the token parameter.
            reason = "consumed" if token in self.consumed_tokens else "expired"
            raise _invalid(
                f"This SharedPaymentGrantedToken has been deactivated ({reason}).",
                code="shared_payment_granted_token_" + reason,
                param=param,
            )
        self.consumed_tokens.add(token)
        intent["payment_method"] = self._id("pm")  # "a new PaymentMethod made from the token"
        self._outcome(intent, kind)

    def _outcome(self, intent: dict[str, Any], kind: str) -> None:
        """Finish a confirmation the way ``kind`` (the test card's documented behaviour) ends."""
        if kind in ("declines", "insufficient_funds"):
            decline = "generic_decline" if kind == "declines" else "insufficient_funds"
            charge = self._charge(intent, succeeded=False)
            error = {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": decline,
                "message": "Your card was declined.",
                "charge": charge["id"],
            }
            intent["status"] = "requires_payment_method"
            intent["last_payment_error"] = dict(error)
            self.intents[intent["id"]] = intent
            raise _StripeError(402, {**error, "payment_intent": self._render_intent(intent, set())})
        if kind == "requires_action":
            intent["status"] = "requires_action"
            intent["next_action"] = {"type": "use_stripe_sdk"}
            return
        self._charge(intent, succeeded=True)
        intent["status"] = "succeeded"
        intent["amount_received"] = intent["amount"]

    def _charge(self, intent: dict[str, Any], *, succeeded: bool) -> dict[str, Any]:
        charge = {
            "id": self._id("ch"),
            "object": "charge",
            "amount": intent["amount"],
            "amount_captured": intent["amount"] if succeeded else 0,
            "amount_refunded": 0,
            "captured": succeeded,
            "currency": intent["currency"],
            "disputed": False,
            "paid": succeeded,
            "payment_intent": intent["id"],
            "refunded": False,
            "status": "succeeded" if succeeded else "failed",
            "failure_code": None if succeeded else "card_declined",
        }
        self.charges[charge["id"]] = charge
        intent["latest_charge"] = charge["id"]
        return charge

    def _render_intent(self, intent: dict[str, Any], expand: set[str]) -> dict[str, Any]:
        rendered = dict(intent)
        charge_id = intent.get("latest_charge")
        if "latest_charge" in expand and charge_id is not None:
            rendered["latest_charge"] = dict(self.charges[charge_id])
        return rendered

    # --- Refunds ------------------------------------------------------------------------------

    def _create_refund(self, account: str, form: dict[str, str]) -> dict[str, Any]:
        intent_id = form.get("payment_intent")
        intent = self.intents.get(intent_id or "")
        if intent is None or self.owners.get(intent["id"]) != account:
            raise _invalid(
                f"No such payment_intent: '{intent_id}'",
                code="resource_missing",
                param="payment_intent",
            )
        charge = self.charges.get(intent.get("latest_charge") or "")
        if charge is None or not charge["paid"]:
            raise _invalid(
                "This PaymentIntent does not have a successful charge to refund.",
                code="charge_not_refundable",
            )
        if charge["refunded"]:
            raise _invalid(
                f"Charge {charge['id']} has already been refunded.",
                code="charge_already_refunded",
            )
        left = charge["amount"] - charge["amount_refunded"]
        amount_text = form.get("amount")
        amount = left if amount_text is None else int(amount_text)
        if amount < 1 or amount > left:
            raise _invalid(
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({left})",
                code="amount_too_large",
                param="amount",
            )
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount"]
        refund = {
            "id": self._id("re"),
            "object": "refund",
            "amount": amount,
            "charge": charge["id"],
            "currency": charge["currency"],
            "payment_intent": intent["id"],
            "metadata": {
                k[len("metadata[") : -1]: v for k, v in form.items() if k.startswith("metadata[")
            },
            "reason": form.get("reason"),
            "status": "succeeded",
        }
        self.refunds[refund["id"]] = refund
        return refund


def _token_kind(token: str) -> str | None:
    for kind in ("succeeds", "declines", "insufficient_funds", "requires_action", "expired"):
        if token == f"spt_{kind}" or token.startswith(f"spt_{kind}_"):
            return kind
    return None


def _error_body(exc: _StripeError) -> dict[str, Any]:
    return {"error": exc.error}


class _Handler(BaseHTTPRequestHandler):
    fake: DevStripe  # set on a subclass per server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, a kept-alive connection waits for
    # the client's delayed ACK (about 40 ms) before the body.
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode() if length else ""
        form = tuple(parse_qsl(raw, keep_blank_values=True))
        query = tuple(parse_qsl(split.query, keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, extra, body = self.fake.handle(self.command, split.path, headers, query, form)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", "req_" + secrets.token_hex(7))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


@contextmanager
def running_devstripe(fake: DevStripe | None = None, *, port: int = 0) -> Iterator[DevStripe]:
    """Serve ``fake`` (a new one by default) on 127.0.0.1 for the duration of the block.

    Loopback only, always: the stand-in's keys are fixed and public. ``port`` 0 lets the kernel
    pick a free one (``fake.url`` says which).
    """
    fake = fake if fake is not None else DevStripe()
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, name="fake-stripe", daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
