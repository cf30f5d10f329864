"""The agent's payment flow, written once for every HTTP client.

:meth:`Agent.pay` is a generator: given the 402 it received, it yields what the client must do next
(:class:`Fetch` a discovery document, :class:`Retry` the request with the proof) and receives each
answer, then returns the :class:`Payment`. The httpx ``Auth`` and the ``requests`` adapter only
drive it. The flow reads the challenge (v2 header, v1 body, plain body), picks the cheapest offer
the policy and budget allow, signs, reserves the amount in the budget as sent (from then on it
counts as spent; a limit it would pass refuses it, and the signature is dropped unsent), retries,
checks the settlement and the PEAC record, and books the receipt; a refusal raises with the
server's code or its own.

What a refusal releases (x402). Nothing, once the authorization has left: the server holds a signature
that moves money until its ``validBefore`` whatever it answered, so a refused, failed or
redirected paid retry leaves the authorization outstanding in the budget (see
:mod:`farebox.agent.budget`); :func:`farebox.agent.reconcile.reconcile` releases it when the chain
shows it expired unused or cancelled. An authorization is reserved only once it is signed and
about to be sent, so nothing else ever needs releasing. The window the agent signs is
the offer's ``maxTimeoutSeconds``, at most ``Policy.max_lifetime`` (longer offers are refused).

Paid, then a bad record. Once money moved, the response is never lost: a PEAC record that is
missing or fails verification is reported in ``Payment.receipt_error`` beside the delivered
response; only ``require_receipt=True`` raises (``receipt_invalid``), and the exception carries
the payment and the answer (the drivers add their own response object as ``.response``).

Idempotent retries: each logical request gets one id (``pay_`` + 32 hex digits), sent as the
``Idempotency-Key`` header and, when the challenge declares the x402 ``payment-identifier``
extension, inside the proof's ``extensions`` too. When the paid retry fails in transport (the
driver throws the error into the flow), the flow yields the very same :class:`Retry` again (same
signed payment, same id, one budget reservation) up to ``resends`` times, so a server that already
settled answers with its stored response instead of charging again. When the resends run out, or
the driver abandons the flow after sending the proof, the reservation is committed: the signed
authorization left the agent and the server may still settle it until it expires.

Cards: an agent with a :class:`~farebox.agent.card.CardWallet` also reads the 402's
``WWW-Authenticate: Payment`` challenges (method ``stripe``, intent ``charge``; others are ignored)
and, following ``prefer`` (x402 first by default: no card fee), pays one of them when it cannot or
would rather not pay x402. The card amount (minor units of a fiat currency) is reserved in the
budget exactly, a Shared Payment Token limited to that amount, currency, seller and the challenge's
expiry is minted (a :class:`~farebox.agent.card.MintToken` step the driver runs), and the request
is retried with ``Authorization: Payment <credential>``. A 2xx must carry a ``Payment-Receipt``
(method ``stripe``, reference the PaymentIntent); the PEAC record, when there is one, must name
the same PaymentIntent, amount and currency. A seller charges the token when it accepts the
credential, before it serves (and refunds what it then fails to serve); so a 402 refusing the
credential releases the reservation (a refused charge moves nothing), while an answer after which
the token may have been charged (a 5xx, the app's own error, ``proof_replayed`` after a lost
answer) counts as spent. (This is the seller's word: unlike an x402 authorization, a card token
cannot be checked on a chain here.) A transport failure resends the very
same credential (the server's single use of the challenge id and Stripe's idempotency key keep it
to one charge); a refusal of that resend as already used counts as spent.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import orjson

from farebox._wire import IDEMPOTENCY_KEY, ISSUER_PATH, PAYMENT_IDENTIFIER
from farebox._wire import PEAC_RECEIPT as _PEAC_RECEIPT
from farebox.agent.book import BookEntry, ReceiptBook
from farebox.agent.budget import Budget, Reservation, SentAuthorization
from farebox.agent.card import CardWallet, MintToken
from farebox.agent.policy import Policy
from farebox.errors import ConfigError, PaymentError, ReceiptError
from farebox.eth import EvmAccount
from farebox.money import ASSETS, Asset, AssetRegistry
from farebox.protocol import mpp
from farebox.protocol.challenge import read_challenge
from farebox.protocol.models import Challenge, Offer, Settlement
from farebox.protocol.x402 import (
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    X_PAYMENT,
    X_PAYMENT_RESPONSE,
    decode_settlement,
    encode_proof,
)
from farebox.receipts import Jwks, VerifiedReceipt, parse_issuer_config, parse_jwks, verify_receipt
from farebox.receipts.keys import https_origin
from farebox.schemes import evm_exact

__all__ = [
    "CARD_RAIL",
    "IDEMPOTENCY_KEY",
    "PAYMENT_IDENTIFIER",
    "X402_RAIL",
    "Agent",
    "Answer",
    "Fetch",
    "MintToken",
    "Payment",
    "PaymentFailed",
    "Retry",
    "Step",
    "card_challenges",
    "new_request_id",
]

#: The rails an agent can pay with, as named in ``Agent.prefer`` and ``Payment.rail``.
X402_RAIL = "x402"
CARD_RAIL = "stripe"
_RAILS = (X402_RAIL, CARD_RAIL)

#: The x402 extension carrying an idempotency id in the proof, and the HTTP header for it.

PEAC_RECEIPT = _PEAC_RECEIPT.lower()  # the drivers hand headers over in lower case
# Card refusals after which the token may have been charged.
_MAYBE_CHARGED = frozenset({"proof_replayed", "ledger_unavailable", "idempotency_in_progress"})
_DISCOVERY_TTL = 300  # PEAC: cache issuer documents for 5 minutes to 24 hours
_MAX_DOCUMENT = 64 * 1024
_COMMERCE = "org.peacprotocol/commerce"


class Retry(NamedTuple):
    """Send the original request again with these headers added.

    When sending fails in transport (reset, timeout), the driver throws the error into the flow;
    the flow then yields the same step again or raises.
    """

    headers: Mapping[str, str]


def new_request_id() -> str:
    """A fresh idempotency id for one logical request (the ``payment-identifier`` format:
    16 to 128 characters of ``[A-Za-z0-9_-]``)."""
    return "pay_" + secrets.token_hex(16)


def _with_request_id(challenge: Challenge, request_id: str) -> dict[str, Any] | None:
    # The client echoes the server's declaration and adds its id to ``info`` (x402 v2 only).
    declared = challenge.extensions.get(PAYMENT_IDENTIFIER)
    if challenge.x402_version != 2 or not isinstance(declared, Mapping):
        return None
    entry = dict(declared)
    info = entry.get("info")
    entry["info"] = {**(dict(info) if isinstance(info, Mapping) else {}), "id": request_id}
    return {PAYMENT_IDENTIFIER: entry}


class Fetch(NamedTuple):
    """``GET`` this URL (a discovery document) and send back the answer."""

    url: str


class Answer(NamedTuple):
    """An HTTP response as the flow sees it: lower-case header names, the whole (bounded) body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


Step = Retry | Fetch | MintToken
#: What a driver sends back into the flow: the answer to a Retry or Fetch, the token id of a
#: MintToken.
Reply = Answer | str


@dataclass(frozen=True, slots=True)
class Payment:
    """What an agent paid for one request, and the evidence it got back.

    ``rail`` is ``"x402"`` or ``"stripe"``. A card payment reads in the same fields: ``offer`` is
    the challenge's terms (scheme ``charge``, network ``stripe``, ``amount`` in minor units,
    ``asset`` the lower-case currency, ``pay_to`` the seller's Stripe profile), ``asset`` is
    ``None`` (a fiat currency is no token), ``settlement.transaction`` is the PaymentIntent id and
    ``payment_receipt`` the server's ``Payment-Receipt``.
    """

    url: str
    offer: Offer
    asset: Asset | None
    payer: str
    settlement: Settlement
    receipt: VerifiedReceipt | None
    receipt_jws: str | None
    rail: str = X402_RAIL
    payment_receipt: mpp.Receipt | None = None
    #: Why ``receipt`` is ``None``: the PEAC record is missing (``E_RECEIPT_MISSING``) or failed
    #: verification (its code). The payment was made either way.
    receipt_error: ReceiptError | None = None


class PaymentFailed(PaymentError):
    """The server answered the paid retry without delivering, or (``require_receipt``) delivered
    without a valid record; carries its status and answer, and ``payment`` when money moved.

    ``response`` is the driver's own response object (``httpx.Response``, ``requests.Response``)
    when a driver raised it, with its body still readable.
    """

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        payer: str | None = None,
        answer: Answer | None = None,
        settlement: Settlement | None = None,
        payment: Payment | None = None,
    ) -> None:
        super().__init__(code, message, status=status, payer=payer)
        self.answer = answer
        self.settlement = settlement
        self.payment = payment
        self.response: Any = None


@dataclass(slots=True)
class _IssuerKeys:
    issuer: str | None  # None: the origin publishes no issuer document (a did:key server)
    jwks: Jwks | None
    revoked: frozenset[str]
    expires: float
    error: str | None = None


def _reply_answer(reply: Reply) -> Answer:
    if not isinstance(reply, Answer):
        raise TypeError("the driver sent a token where an HTTP answer was due")
    return reply


def _reply_token(reply: Reply) -> str:
    if not isinstance(reply, str):
        raise TypeError("the driver sent an HTTP answer where a token was due")
    return reply


def card_challenges(answer: Answer) -> list[mpp.Challenge]:
    """The ``Payment`` challenges (intent ``charge``) of a 402; a malformed header gives none."""
    value = answer.headers.get(mpp.WWW_AUTHENTICATE.lower())
    if not value:
        return []
    try:
        return mpp.parse_www_authenticate(value)
    except PaymentError:
        return []


@dataclass(frozen=True, slots=True)
class _Choice:
    rail: str
    challenge: Challenge | None = None
    offer: Offer | None = None
    asset: Asset | None = None
    card: mpp.Challenge | None = None


@dataclass
class Agent:
    """An agent that pays x402 APIs with ``account`` and card challenges with ``card``, within
    ``policy`` and ``budget``. It needs at least one of the two.

    The default budget allows $0.10 per request (in USD-pegged assets) and is not persisted.

    ``book`` keeps every receipt. A paid response whose PEAC record is missing (most x402 servers
    send none) or fails verification is delivered with ``Payment.receipt_error`` saying why;
    ``require_receipt`` refuses it instead (``receipt_invalid``; the spend is still committed:
    the money moved).
    ``clock`` gives Unix seconds. ``resends`` is how many times a paid retry that failed in
    transport is sent again, unchanged, before the error is raised. ``prefer`` orders the rails
    (``"x402"``, ``"stripe"``) when a 402 offers both and both are payable.
    """

    account: EvmAccount | None = None
    # Without a budget of its own, an agent pays at most 10 cents a request and keeps no history.
    budget: Budget = field(default_factory=lambda: Budget.from_prices(None, per_request="$0.10"))
    policy: Policy = field(default_factory=Policy)
    book: ReceiptBook | None = None
    assets: AssetRegistry = ASSETS
    require_receipt: bool = False
    clock: Callable[[], float] = time.time
    resends: int = 2
    card: CardWallet | None = None
    prefer: Sequence[str] = (X402_RAIL, CARD_RAIL)
    _issuers: dict[str, _IssuerKeys] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.account is None and self.card is None:
            raise ConfigError("an agent needs an EVM account, a card, or both")
        if isinstance(self.prefer, str) or not self.prefer:
            raise ConfigError("prefer is a non-empty sequence of rails")
        unknown = [r for r in self.prefer if r not in _RAILS]
        if unknown:
            raise ConfigError(f"unknown rails in prefer: {unknown}; known: {list(_RAILS)}")
        self.prefer = tuple(self.prefer)

    @property
    def payer(self) -> str:
        """Who pays, for records: the EVM address, else the card's label."""
        if self.account is not None:
            return self.account.address
        return self.card.label if self.card is not None else ""

    # --- choosing -----------------------------------------------------------------------------

    def choose(self, challenge: Challenge) -> tuple[Offer, Asset]:
        """The cheapest offer (in budget units) that the policy allows and the agent can sign."""
        payable: list[tuple[int, Offer, Asset]] = []
        reasons: list[str] = []
        for offer in challenge.accepts:
            asset = self.assets.find(offer.network, offer.asset)
            why = self.policy.refusal(offer, asset)
            if why is None and offer.scheme != evm_exact.SCHEME:
                why = f"scheme {offer.scheme} is not supported"
            domain = (offer.extra.get("name"), offer.extra.get("version"))
            if why is None and asset is not None and (asset.name, asset.version) != domain:
                why = f"offer's EIP-712 domain differs from the known {asset.symbol} on {asset.network}"
            if why is None and asset is not None:
                try:
                    payable.append((self.budget.to_units(offer.amount, asset), offer, asset))
                except PaymentError as exc:
                    why = exc.message
            if why is not None:
                reasons.append(why)
        if not payable:
            raise PaymentError("no_payable_offer", "; ".join(reasons)[:500] or "no offers")
        payable.sort(key=lambda item: item[0])
        return payable[0][1], payable[0][2]

    def choose_card(self, challenges: Sequence[mpp.Challenge]) -> mpp.Challenge:
        """The cheapest card challenge (in budget units) the card can pay and the budget's currency
        allows; ``no_payable_offer`` otherwise."""
        if self.card is None:
            raise PaymentError("no_payable_offer", "the agent holds no card")
        now = self.clock()
        payable: list[tuple[int, int, mpp.Challenge]] = []
        reasons: list[str] = []
        for index, challenge in enumerate(challenges):
            why = self.card.refusal(challenge, now=now)
            if why is None:
                why = self.policy.card_refusal(
                    mpp.StripeDetails.from_request(challenge.request).network_id
                )
            if why is None:
                try:
                    units = self.budget.fiat_units(
                        challenge.request.amount, challenge.request.currency
                    )
                    payable.append((units, index, challenge))
                except PaymentError as exc:
                    why = exc.message
            if why is not None:
                reasons.append(why)
        if not payable:
            raise PaymentError("no_payable_offer", "; ".join(reasons)[:500] or "no card challenge")
        payable.sort(key=lambda item: (item[0], item[1]))
        return payable[0][2]

    def _choose_rail(self, first: Answer) -> _Choice:
        if self.card is None:
            # An x402-only agent: the challenge's and the offers' own errors, as they always were.
            only = read_challenge(first.headers, first.body)
            offer, asset = self.choose(only)
            return _Choice(X402_RAIL, only, offer, asset)
        reasons: dict[str, str] = {}
        choices: dict[str, _Choice] = {}
        try:
            challenge: Challenge | None = read_challenge(first.headers, first.body)
        except PaymentError as exc:
            challenge = None
            reasons[X402_RAIL] = exc.message
        if self.account is None:
            reasons[X402_RAIL] = "the agent holds no EVM account"
        elif challenge is not None:
            try:
                offer, asset = self.choose(challenge)
                choices[X402_RAIL] = _Choice(X402_RAIL, challenge, offer, asset)
            except PaymentError as exc:
                reasons[X402_RAIL] = exc.message
        try:
            card = self.choose_card(card_challenges(first))
            choices[CARD_RAIL] = _Choice(CARD_RAIL, card=card)
        except PaymentError as exc:
            reasons[CARD_RAIL] = exc.message
        for rail in self.prefer:
            if rail in choices:
                return choices[rail]
        detail = "; ".join(f"{rail}: {why}" for rail, why in reasons.items())
        raise PaymentError("no_payable_offer", detail[:500] or "no offers")

    # --- the flow -----------------------------------------------------------------------------

    def pay(self, method: str, url: str, first: Answer) -> Generator[Step, Reply, Payment | None]:
        """Pay for the request that got the 402 ``first``; see the module docstring.

        Returns ``None`` when the paid retry got the app's own error or redirect without a
        settlement: the caller hands that response back as it is (an x402 authorization stays
        counted in the budget until the chain shows what became of it; see the module docstring).
        """
        self.policy.check_url(url)
        choice = self._choose_rail(first)
        if choice.card is not None:
            return (yield from self._pay_card(method, url, choice.card))
        challenge, offer, asset, account = (
            choice.challenge,
            choice.offer,
            choice.asset,
            self.account,
        )
        assert challenge is not None
        assert offer is not None
        assert asset is not None
        assert account is not None
        # Refused before any fetch or signature when it cannot fit; reserve() below decides.
        self.budget.check(offer.amount, asset=asset, now=int(self.clock()))
        keys = yield from self._issuer_keys(url)
        now = int(self.clock())
        request_id = new_request_id()
        proof = evm_exact.make_proof(
            account,
            offer,
            now=now,
            nonce=secrets.token_bytes(32),
            resource=challenge.resource,
            x402_version=challenge.x402_version,
            extensions=_with_request_id(challenge, request_id),
        )
        header = PAYMENT_SIGNATURE if proof.x402_version == 2 else X_PAYMENT
        step = Retry({header: encode_proof(proof), IDEMPOTENCY_KEY: request_id})
        # Reserved as spent before it leaves, in one transaction with the limits' check: from
        # the first byte sent the authorization can move money until its validBefore, whatever
        # the server answers or whether this process lives to read the answer.
        reservation = self.budget.reserve(
            offer.amount,
            asset=asset,
            now=now,
            payee=offer.pay_to,
            resource=url,
            authorization=_sent(offer, proof.payload),
        )
        answer = yield from self._send(step)
        return self._conclude(method, url, offer, asset, reservation, keys, answer)

    def _send(self, step: Retry) -> Generator[Step, Reply, Answer]:
        """Send the paid retry; after a transport failure (thrown in by the driver) the very same
        step again, up to ``resends`` times: the same proof or credential and the same id, so a
        server that already took the payment replays its answer (or refuses the reuse) instead of
        charging twice; the schemes (a nonce, a challenge id and Stripe's idempotency key) make
        the payment itself single use."""
        failures = 0
        while True:
            try:
                return _reply_answer((yield step))
            except Exception:
                failures += 1
                if failures > self.resends:
                    raise

    def _unreserve(self, reservation: Reservation, *, sent: bool) -> None:
        """The flow failed: a payment that left the agent (a signed authorization, a token) may
        still be taken until it expires, so it counts as spent; one that never left is released."""
        if sent:
            self.budget.commit(reservation, now=int(self.clock()))
        else:
            self.budget.release(reservation)

    def _pay_card(
        self, method: str, url: str, challenge: mpp.Challenge
    ) -> Generator[Step, Reply, Payment | None]:
        wallet = self.card
        assert wallet is not None
        terms = challenge.request
        seller = mpp.StripeDetails.from_request(terms).network_id
        now = int(self.clock())
        reservation = self.budget.reserve(
            terms.amount, currency=terms.currency, now=now, payee=seller, resource=url
        )
        sent = False
        try:
            keys = yield from self._issuer_keys(url)
            mint = wallet.mint_request(challenge, now=now)
            spt = _reply_token((yield MintToken(wallet, mint)))
            credential = mpp.Credential(
                challenge=challenge.echo(), payload=mpp.StripePayload(spt).to_json()
            )
            header = challenge.header or mpp.AUTHORIZATION
            # One id per logical request: a resend after a lost answer gets the stored response
            # from a server that keeps them (farebox does) instead of a refusal.
            step = Retry(
                {header: mpp.render_authorization(credential), IDEMPOTENCY_KEY: new_request_id()}
            )
            sent = True
            answer = yield from self._send(step)
        except BaseException:
            self._unreserve(reservation, sent=sent)
            raise
        return self._conclude_card(method, url, challenge, seller, reservation, keys, answer)

    def _conclude_card(
        self,
        method: str,
        url: str,
        challenge: mpp.Challenge,
        seller: str,
        reservation: Reservation,
        keys: _IssuerKeys,
        answer: Answer,
    ) -> Payment | None:
        wallet = self.card
        assert wallet is not None
        payer = wallet.label
        amount = challenge.request.amount
        currency = challenge.request.currency.lower()
        header = answer.headers.get(mpp.PAYMENT_RECEIPT.lower())
        if answer.status >= 300:
            code, message = _refusal_of(answer, None)
            app_answer = answer.status != 402 and "www-authenticate" not in answer.headers
            if app_answer or code in _MAYBE_CHARGED or answer.status >= 500:
                # The token left the agent and may have been charged: by our own earlier send
                # (proof_replayed after a lost answer), by a charge whose answer the seller lost,
                # or before an app that then failed (sellers charge before serving; farebox
                # refunds what it did not serve, others may not). Counted, never less than spent.
                self.budget.commit(reservation, now=int(self.clock()))
            else:
                self.budget.release(reservation)  # refused before any charge: no money moved
            if app_answer:
                return None  # the app's own error or redirect, handed back as it is
            raise PaymentFailed(code, message, status=answer.status, payer=payer, answer=answer)
        paid: mpp.Receipt | None = None
        unreadable = "the paid response carries no Payment-Receipt"
        if header is not None:
            try:
                paid = mpp.parse_payment_receipt(header)
            except PaymentError as exc:
                unreadable = f"Payment-Receipt: {exc.message}"
            else:
                if paid.method != CARD_RAIL or not paid.reference.startswith("pi_"):
                    unreadable = "the Payment-Receipt is not a Stripe PaymentIntent"
                    paid = None
        now = int(self.clock())
        if paid is None:
            # A 2xx to a presented token: the seller may have charged it.
            self.budget.commit(reservation, now=now)
            raise PaymentFailed(
                "receipt_invalid", f"paid by card, but {unreadable}", payer=payer, answer=answer
            )
        reference = paid.reference
        self.budget.commit(reservation, now=now, reference=reference)
        offer = Offer(
            scheme="charge",
            network=CARD_RAIL,
            amount=amount,
            asset=currency,
            pay_to=seller,
            extra={"challenge_id": challenge.id, "realm": challenge.realm},
        )
        settlement = Settlement(
            success=True, network=CARD_RAIL, transaction=reference, payer=payer, amount=amount
        )
        expected = {
            "payment_rail": CARD_RAIL,
            "amount_minor": str(amount),
            "currency": currency.upper(),
            "reference": reference,
            "event": "settlement",
        }
        jws, receipt, problem = self._check_record(answer, keys, url, expected, now)
        payment = Payment(
            url, offer, None, payer, settlement, receipt, jws, rail=CARD_RAIL, payment_receipt=paid
        )
        return self._deliver(method, answer, payment, problem, now)

    def _conclude(
        self,
        method: str,
        url: str,
        offer: Offer,
        asset: Asset,
        reservation: Reservation,
        keys: _IssuerKeys,
        answer: Answer,
    ) -> Payment | None:
        settlement = self._settlement(answer)
        settled = settlement is not None and settlement.success
        if settled and settlement is not None:
            # Settled: spent for good, whatever else the answer says.
            self.budget.commit(reservation, now=int(self.clock()), reference=settlement.transaction)
        if answer.status == 402 or not settled:
            # Unless settled, the authorization stays outstanding in the budget (see the module
            # docstring): a refusal, an error or a redirect is the server's word, not the chain's.
            refused_by_gate = answer.status == 402 or "payment-required" in answer.headers
            if settlement is None and not refused_by_gate:
                # The app's own error or redirect: the caller gets it as it is.
                return None
            code, message = _refusal_of(answer, settlement)
            raise PaymentFailed(
                code,
                message,
                status=answer.status,
                payer=self.payer,
                answer=answer,
                settlement=settlement,
            )
        # Paid: whatever the status (a 3xx reaches the caller unfollowed; an app's error after a
        # settlement is still what was paid for), the response comes with its Payment.
        assert settlement is not None
        now = int(self.clock())
        expected = {
            "amount_minor": str(offer.amount),
            "reference": settlement.transaction,
            "event": "settlement",
        }
        jws, receipt, problem = self._check_record(answer, keys, url, expected, now)
        payment = Payment(url, offer, asset, self.payer, settlement, receipt, jws)
        return self._deliver(method, answer, payment, problem, now)

    def _check_record(
        self, answer: Answer, keys: _IssuerKeys, url: str, expected: Mapping[str, str], now: int
    ) -> tuple[str | None, VerifiedReceipt | None, ReceiptError | None]:
        """The paid response's PEAC record: ``(jws, verified record, why not)``."""
        jws = answer.headers.get(PEAC_RECEIPT)
        if jws is None:
            missing = ReceiptError("E_RECEIPT_MISSING", "the paid response carries no PEAC-Receipt")
            return None, None, missing
        try:
            return jws, self._verify_record(jws, keys, url, expected, now), None
        except ReceiptError as exc:
            return jws, None, exc

    def _deliver(
        self, method: str, answer: Answer, payment: Payment, problem: ReceiptError | None, now: int
    ) -> Payment:
        """Book a payment that was made and deliver it with its record's problem, if any, in
        ``receipt_error``; under ``require_receipt`` a missing or failing record refuses it."""
        offer, receipt = payment.offer, payment.receipt
        transaction = payment.settlement.transaction or None
        if self.book is not None:
            self.book.add(
                BookEntry(
                    at=now,
                    url=payment.url,
                    method=method,
                    status=answer.status,
                    network=offer.network,
                    asset=offer.asset,
                    amount=offer.amount,
                    pay_to=offer.pay_to,
                    payer=payment.payer,
                    transaction=transaction,
                    receipt_jws=payment.receipt_jws,
                    receipt_ref=receipt.receipt_ref if receipt is not None else None,
                    issuer=receipt.issuer if receipt is not None else None,
                    verified=receipt is not None,
                )
            )
        if problem is None:
            return payment
        payment = replace(payment, receipt_error=problem)
        if self.require_receipt:
            what = "PaymentIntent" if payment.rail == CARD_RAIL else "transaction"
            raise PaymentFailed(
                "receipt_invalid",
                f"paid ({what} {transaction}), but the receipt failed: {problem}",
                payer=payment.payer,
                answer=answer,
                settlement=payment.settlement,
                payment=payment,
            )
        return payment

    def _settlement(self, answer: Answer) -> Settlement | None:
        header = answer.headers.get(PAYMENT_RESPONSE.lower()) or answer.headers.get(
            X_PAYMENT_RESPONSE.lower()
        )
        if header is None:
            return None
        try:
            return decode_settlement(header)
        except PaymentError:
            return None

    # --- receipts -----------------------------------------------------------------------------

    def _issuer_keys(self, url: str) -> Generator[Step, Reply, _IssuerKeys]:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        now = time.monotonic()
        with self._lock:
            cached = self._issuers.get(origin)
        if cached is not None and cached.expires > now:
            return cached
        keys = _IssuerKeys(None, None, frozenset(), now + _DISCOVERY_TTL)
        # PEAC discovery is https-only: a plain-http origin can only sign as a did:key.
        if https_origin(url) is not None:
            doc = _reply_answer((yield Fetch(origin + ISSUER_PATH)))
            if doc.status == 200 and len(doc.body) <= _MAX_DOCUMENT:
                try:
                    config = parse_issuer_config(doc.body, expected_issuer=origin)
                    jwks_answer = _reply_answer((yield Fetch(config.jwks_uri)))
                    if jwks_answer.status != 200 or len(jwks_answer.body) > _MAX_DOCUMENT:
                        raise ReceiptError("E_VERIFY_JWKS_FETCH_FAILED", "JWKS fetch failed")
                    keys = _IssuerKeys(
                        config.issuer,
                        parse_jwks(jwks_answer.body),
                        config.revoked_kids,
                        now + _DISCOVERY_TTL,
                    )
                except ReceiptError as exc:
                    keys.error = f"{exc.code}: {exc.message}"
            elif doc.status != 404:
                keys.error = f"issuer document answered HTTP {doc.status}"
        with self._lock:
            self._issuers[origin] = keys
        return keys

    def _verify_record(
        self, jws: str, keys: _IssuerKeys, url: str, expected: Mapping[str, str], now: int
    ) -> VerifiedReceipt:
        """Verify the PEAC record's signature and that it names ``url`` and the ``expected``
        commerce fields."""
        if keys.error is not None:
            raise ReceiptError("E_VERIFY_ISSUER_CONFIG_INVALID", keys.error)
        if keys.issuer is not None:
            receipt = verify_receipt(
                jws, keys.jwks, now=now, issuer=keys.issuer, revoked_kids=keys.revoked
            )
        else:
            # No issuer document: only a self-certifying did:key record can be checked.
            receipt = verify_receipt(jws, None, now=now)
            if not receipt.issuer.startswith("did:key:"):
                raise ReceiptError(
                    "E_VERIFY_ISSUER_CONFIG_INVALID",
                    f"{receipt.issuer} publishes no peac-issuer.json at the resource's origin",
                )
        commerce = receipt.claims.get("extensions", {}).get(_COMMERCE, {})
        checks = {"sub": (receipt.claims.get("sub"), url)}
        checks.update({name: (commerce.get(name), want) for name, want in expected.items()})
        for name, (got, want) in checks.items():
            if got != want:
                raise ReceiptError(
                    "E_RECEIPT_MISMATCH", f"receipt {name} is {got!r}, the payment's is {want!r}"
                )
        return receipt


def _sent(offer: Offer, payload: Mapping[str, Any]) -> SentAuthorization:
    """What names the signed authorization in ``payload`` on chain, for the budget."""
    authorization = payload["authorization"]
    return SentAuthorization(
        network=offer.network,
        token=offer.asset,
        authorizer=authorization["from"],
        nonce=authorization["nonce"],
        valid_before=int(authorization["validBefore"]),
    )


def _refusal_of(answer: Answer, settlement: Settlement | None) -> tuple[str, str]:
    if settlement is not None and settlement.error_reason:
        return settlement.error_reason, settlement.error_message or settlement.error_reason
    if answer.body and len(answer.body) <= _MAX_DOCUMENT:
        try:
            body: Any = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict):
            code = body.get("code") or body.get("error")
            kind = body.get("type")
            if not code and isinstance(kind, str) and kind.startswith(mpp.PROBLEM_TYPE_BASE):
                code = kind[len(mpp.PROBLEM_TYPE_BASE) :]
            if isinstance(code, str) and code:
                detail = body.get("detail")
                return code[:100], detail[:500] if isinstance(detail, str) else code
    if answer.status == 402:
        return "unexpected_settle_error", "the server refused the payment without a reason"
    return "unexpected_settle_error", f"the paid request answered HTTP {answer.status}"
