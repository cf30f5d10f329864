"""A FAKE card ledger for tests: farebox's own Stripe ledger, talking in process to a fake Stripe.

:class:`FakeCardLedger` is a :class:`~farebox.ledgers.stripe.StripeLedger`: every check and every
error translation the card rail relies on is the real one. Only the other end is fake: instead of
Stripe's servers, its Stripe client calls :class:`~farebox.dev.devstripe.DevStripe` directly
(no socket, no thread, no network), the stand-in written by hand to follow Stripe's documented API
(its docstring lists the pages it follows and the choices it makes where they are silent). It
needs the ``stripe`` extra (the official library builds the requests).
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio

import stripe as stripe_lib
from farebox.dev.devstripe import DevStripe
from farebox.errors import PaymentError
from farebox.ledgers.stripe import StripeLedger

__all__ = ["FakeCardLedger"]

# A reserved name (RFC 2606): should a request ever escape the in-process client, it goes nowhere.
_API_BASE = "https://stripe.farebox-testing.invalid"


class _InProcess(stripe_lib.HTTPClient):
    """A Stripe HTTP client that hands each request to a :class:`DevStripe`, in this process."""

    name = "farebox-testing"

    def __init__(self, fake: DevStripe) -> None:
        super().__init__()
        self.fake = fake
        self.down = False

    def _answer(
        self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any
    ) -> tuple[bytes, int, Mapping[str, str]]:
        if self.down:
            # What the library raises when Stripe cannot be reached; the ledger translates it.
            # (stripe 16 leaves this constructor unannotated.)
            raise stripe_lib.APIConnectionError(  # type: ignore[no-untyped-call]
                "Stripe is unreachable (FakeCardLedger.down)"
            )
        split = urlsplit(url)
        raw = post_data.decode() if isinstance(post_data, bytes) else (post_data or "")
        status, extra, body = self.fake.handle(
            method.upper(),
            split.path,
            {k.lower(): v for k, v in (headers or {}).items()},
            tuple(parse_qsl(split.query, keep_blank_values=True)),
            tuple(parse_qsl(raw, keep_blank_values=True)),
        )
        answer = {"Content-Type": "application/json", "Request-Id": "req_" + secrets.token_hex(7)}
        return json.dumps(body).encode(), status, {**answer, **extra}

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        return self._answer(method, url, headers, post_data)

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        return self._answer(method, url, headers, post_data)

    # Streamed answers (Stripe uses them for file contents) are the same answers, handed over
    # as a stream: the whole body in one piece, as a small response arrives.
    def request_stream(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[Any, int, Mapping[str, str]]:
        body, status, answer = self._answer(method, url, headers, post_data)
        return io.BytesIO(body), status, answer

    async def request_stream_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[AsyncIterator[bytes], int, Mapping[str, str]]:
        body, status, answer = self._answer(method, url, headers, post_data)

        async def pieces() -> AsyncIterator[bytes]:
            yield body

        return pieces(), status, answer

    def sleep_async(self, secs: float) -> Awaitable[None]:
        return anyio.sleep(secs)

    def close(self) -> None:
        return None

    async def close_async(self) -> None:
        return None


class FakeCardLedger(StripeLedger):
    """A FAKE card ledger for tests, never for real money: pass it to
    :class:`~farebox.CardRail` where a :class:`~farebox.ledgers.stripe.StripeLedger`
    goes, and route :class:`~farebox.CardOffer` ``network_id`` to :attr:`profile`.

    ``stripe`` is the fake Stripe's state (a new :class:`~farebox.dev.devstripe.DevStripe` by
    default): its ``intents``, ``charges``, ``refunds`` and ``requests`` show what was asked.
    How a charge ends is chosen by the Shared Payment Token, as with Stripe's test tokens:
    ``spt_succeeds`` succeeds, ``spt_declines`` and ``spt_insufficient_funds`` are declined
    (``card_declined``), ``spt_requires_action`` needs 3-D Secure (``card_action_required``),
    ``spt_expired`` and unknown tokens are refused (``card_token_invalid``); any suffix
    (``spt_succeeds_2``) makes a distinct token, and each token pays once. Set :attr:`down` to
    make Stripe unreachable (``ledger_unavailable``). Other keyword arguments go to
    :class:`~farebox.ledgers.stripe.StripeLedger`.
    """

    def __init__(
        self,
        stripe: DevStripe | None = None,
        *,
        payment_method_types: Sequence[str] = ("card",),
        **options: Any,
    ) -> None:
        self.stripe = stripe if stripe is not None else DevStripe()
        self._http = _InProcess(self.stripe)
        client = stripe_lib.StripeClient(
            self.stripe.api_key,
            base_addresses={"api": _API_BASE},
            max_network_retries=0,
            http_client=self._http,
        )
        super().__init__(client, payment_method_types=payment_method_types, **options)

    @property
    def profile(self) -> str:
        """The seller's Stripe profile: the ``network_id`` of the routes' card offers."""
        return self.stripe.profile

    @property
    def down(self) -> bool:
        """Whether Stripe is unreachable: every call then fails as a lost connection does."""
        return self._http.down

    @down.setter
    def down(self, value: bool) -> None:
        self._http.down = value

    def pay_invoice(self, client_secret: str, *, payment_method: str = "pm_card_visa") -> str:
        """Confirm an X-Receipt invoice's PaymentIntent as the payer's browser would (the
        publishable key and the 402's ``client_secret``); returns the PaymentIntent id, the
        ``X-Receipt`` to resend. ``pm_card_chargeDeclined`` declines (raises ``card_declined``),
        ``pm_card_authenticationRequired`` leaves it needing 3-D Secure."""
        intent = client_secret.partition("_secret_")[0]
        status, _, body = self.stripe.handle(
            "POST",
            f"/v1/payment_intents/{intent}/confirm",
            {"authorization": "Bearer " + self.stripe.publishable_key},
            (),
            (("payment_method", payment_method), ("client_secret", client_secret)),
        )
        if status != 200:
            error = body.get("error", {})
            code = error.get("code") if isinstance(error, dict) else None
            if code == "card_declined":
                raise PaymentError("card_declined", "the card was declined")
            raise PaymentError("card_payment_failed", f"the fake Stripe answered {status}")
        return str(body["id"])
