"""The agent pays by card: MPP ``Payment`` (method ``stripe``) with a Shared Payment Token it mints.

The server is farebox's gate with its card rail, served by uvicorn on 127.0.0.1; x402 runs on the
embedded chain. Stripe is ``tests/support/fake_stripe.py``, a FAKE that follows Stripe's documented
API (Stripe cannot be reached from here): the agent mints with its own key there and the seller
charges the token with its key there.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from farebox.agent.agent import Agent, Payment, PaymentFailed
from farebox.agent.budget import Budget, fiat_to_units
from farebox.agent.card import ISSUED_TOKENS_PATH, CardWallet, mint_idempotency_key
from farebox.agent.httpx_auth import PAYMENT_EXTENSION, PaymentAuth, PaymentTransport
from farebox.agent.policy import Policy
from farebox.agent.requests_adapter import PaymentSession
from farebox.dev.devchain import DevChain
from farebox.errors import ConfigError, PaymentError
from farebox.eth import EvmAccount
from farebox.protocol import mpp
from tests.support.chain import fund
from tests.support.fake_stripe import AGENT_KEY, FakeStripe

stripe = pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")

from farebox.ledgers.stripe import STRIPE_PREVIEW_VERSION  # noqa: E402
from tests.support.card_seller import CENTS, INTENTS, Seller, card_agent  # noqa: E402

pytestmark = [
    # stripe 16.1's HTTPXClient hands httpx the form body as ``data=<bytes>`` (deprecated in 0.28).
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning"),
]


def check_card_payment(agent: Agent, payment: Payment, fake: FakeStripe, seller: Seller) -> None:
    """One token minted with exactly the challenge's terms, one charge, one booked receipt."""
    [intent] = fake.intents.values()
    assert (intent["amount"], intent["currency"], intent["status"]) == (50, "usd", "succeeded")
    assert payment.rail == "stripe"
    assert payment.settlement.transaction == intent["id"]
    assert payment.payment_receipt is not None
    assert payment.payment_receipt.reference == intent["id"]
    assert payment.receipt is not None  # the PEAC record verified (did:key issuer)
    assert (payment.offer.amount, payment.offer.asset, payment.offer.pay_to) == (
        50,
        "usd",
        fake.profile,
    )
    [authorization] = seller.authorizations
    credential = mpp.parse_authorization(authorization)
    [charge] = fake.posts(INTENTS)
    assert dict(credential.payload) == {"spt": charge.fields["shared_payment_granted_token"]}
    echo = credential.challenge
    assert intent["metadata"]["mpp_challenge_id"] == echo.id
    assert echo.expires is not None
    expires_at = int(mpp.parse_rfc3339(echo.expires).timestamp())
    [mint] = fake.posts(ISSUED_TOKENS_PATH)
    assert mint.headers["authorization"] == f"Bearer {AGENT_KEY}"
    assert mint.headers["stripe-version"] == STRIPE_PREVIEW_VERSION
    assert mint.headers["idempotency-key"] == mint_idempotency_key(echo.id, "pm_card_visa")
    assert mint.form == (
        ("payment_method", "pm_card_visa"),
        ("usage_limits[currency]", "usd"),
        ("usage_limits[max_amount]", "50"),
        ("usage_limits[expires_at]", str(expires_at)),
        ("seller_details[network_business_profile]", fake.profile),
    )
    assert len(fake.posts(INTENTS)) == 1
    spent = agent.budget.spent(now=int(time.time()))
    assert (spent.total_committed, spent.total_reserved) == (50 * CENTS, 0)
    assert agent.book is not None
    [entry] = agent.book.entries()
    assert (entry.network, entry.asset, entry.amount, entry.pay_to) == (
        "stripe",
        "usd",
        50,
        fake.profile,
    )
    assert (entry.transaction, entry.payer, entry.verified) == (intent["id"], "agent-card", True)


# --- end to end, three drivers -------------------------------------------------------------------


def test_a_card_only_agent_pays_with_httpx(
    fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe)
    transport = PaymentTransport(httpx.HTTPTransport())
    with httpx.Client(auth=PaymentAuth(agent), transport=transport) as client:
        response = client.get(f"{seller.base}/report")
    assert response.status_code == 200
    assert response.text == "the goods"
    payment = response.extensions[PAYMENT_EXTENSION]
    check_card_payment(agent, payment, fake, seller)
    receipt = mpp.parse_payment_receipt(response.headers["payment-receipt"])
    assert receipt.reference == payment.settlement.transaction


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_card_only_agent_pays_with_async_httpx(
    fake: FakeStripe, seller: Seller, anyio_backend: str
) -> None:
    http_client = stripe.HTTPXClient()  # async only: a sync mint would fail here
    client = stripe.StripeClient(
        AGENT_KEY, base_addresses={"api": fake.url}, max_network_retries=0, http_client=http_client
    )
    agent = card_agent(client)
    try:
        transport = PaymentTransport(httpx.AsyncHTTPTransport())
        async with httpx.AsyncClient(auth=PaymentAuth(agent), transport=transport) as http:
            response = await http.get(f"{seller.base}/report")
    finally:
        await http_client.close_async()
    assert response.status_code == 200
    assert response.text == "the goods"
    check_card_payment(agent, response.extensions[PAYMENT_EXTENSION], fake, seller)


def test_a_card_only_agent_pays_with_requests(
    fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe)
    with PaymentSession(agent) as session:
        response = session.get(f"{seller.base}/report")
    assert response.status_code == 200
    assert response.text == "the goods"
    check_card_payment(agent, response.farebox_payment, fake, seller)  # type: ignore[attr-defined]


# --- refusals ------------------------------------------------------------------------------------


def test_over_the_budget_nothing_is_minted_or_charged(
    fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe, per_request="$0.25")
    with (
        httpx.Client(auth=PaymentAuth(agent)) as client,
        pytest.raises(PaymentError) as caught,
    ):
        client.get(f"{seller.base}/report")
    assert caught.value.code == "budget_exceeded"
    assert fake.posts(ISSUED_TOKENS_PATH) == []
    assert fake.posts(INTENTS) == []
    assert seller.authorizations == []


def test_a_declined_card_fails_and_releases_the_budget(
    fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe, payment_method="pm_card_chargeDeclined")
    with PaymentSession(agent) as session, pytest.raises(PaymentFailed) as caught:
        session.get(f"{seller.base}/report")
    assert caught.value.code == "card_declined"
    assert caught.value.status == 402
    assert len(fake.posts(ISSUED_TOKENS_PATH)) == 1
    [intent] = fake.intents.values()
    assert intent["status"] != "succeeded"
    spent = agent.budget.spent(now=int(time.time()))
    assert (spent.total_committed, spent.total_reserved) == (0, 0)
    assert agent.book is not None
    assert agent.book.entries() == []


def test_a_mint_refused_by_stripe_releases_the_budget(
    fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe, payment_method="pm_unknown_card")
    with httpx.Client(auth=PaymentAuth(agent)) as client, pytest.raises(PaymentError) as caught:
        client.get(f"{seller.base}/report")
    assert caught.value.code == "card_token_invalid"
    assert AGENT_KEY not in caught.value.message
    assert seller.authorizations == []
    spent = agent.budget.spent(now=int(time.time()))
    assert (spent.total_committed, spent.total_reserved) == (0, 0)


# --- transport failures --------------------------------------------------------------------------


class Dropping(httpx.BaseTransport):
    """Fails the first paid request: before sending it (``after=False``) or after the server
    answered it (``after=True``, a lost answer). Records every credential sent."""

    def __init__(self, *, after: bool, strip_idempotency: bool = False) -> None:
        self.inner = httpx.HTTPTransport()
        self.after = after
        self.strip_idempotency = strip_idempotency
        self.sent: list[str] = []
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        credential = request.headers.get("authorization")
        if self.strip_idempotency:
            request.headers.pop("idempotency-key", None)
        if credential is not None:
            self.sent.append(credential)
            self.keys.append(request.headers.get("idempotency-key"))
            if len(self.sent) == 1:
                if self.after:
                    self.inner.handle_request(request).read()
                    raise httpx.ReadError("connection reset", request=request)
                raise httpx.ConnectError("connection refused", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_a_dropped_connection_resends_the_same_credential_charged_once(
    fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe)
    dropping = Dropping(after=False)
    with httpx.Client(auth=PaymentAuth(agent), transport=PaymentTransport(dropping)) as client:
        response = client.get(f"{seller.base}/report")
    assert response.status_code == 200
    first, second = dropping.sent
    assert first == second
    check_card_payment(agent, response.extensions[PAYMENT_EXTENSION], fake, seller)


def test_a_lost_answer_is_replayed_not_paid_twice(
    fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe)
    dropping = Dropping(after=True)
    with httpx.Client(auth=PaymentAuth(agent), transport=PaymentTransport(dropping)) as client:
        response = client.get(f"{seller.base}/report")
    # The first send was served and charged, its answer lost; the resend of the same credential
    # under the same Idempotency-Key gets the stored answer.
    assert response.status_code == 200
    assert response.headers["idempotent-replayed"] == "true"
    first, second = dropping.sent
    assert first == second
    assert dropping.keys[0] is not None
    assert dropping.keys[0] == dropping.keys[1]
    assert len(fake.posts(ISSUED_TOKENS_PATH)) == 1
    [intent] = fake.intents.values()
    assert intent["status"] == "succeeded"
    spent = agent.budget.spent(now=int(time.time()))
    assert (spent.total_committed, spent.total_reserved) == (50 * CENTS, 0)


def test_a_lost_answer_without_the_key_is_not_paid_twice_and_counts_as_spent(
    fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    # A server that keeps no responses: the resend is refused as used, the charge counted.
    agent = card_agent(agent_stripe)
    dropping = Dropping(after=True, strip_idempotency=True)
    with (
        httpx.Client(auth=PaymentAuth(agent), transport=PaymentTransport(dropping)) as client,
        pytest.raises(PaymentFailed) as caught,
    ):
        client.get(f"{seller.base}/report")
    assert caught.value.code == "proof_replayed"
    assert len(fake.posts(ISSUED_TOKENS_PATH)) == 1
    [intent] = fake.intents.values()
    assert intent["id"] in (caught.value.message or "")
    spent = agent.budget.spent(now=int(time.time()))
    assert (spent.total_committed, spent.total_reserved) == (50 * CENTS, 0)


def test_an_app_error_after_the_charge_comes_back_as_is_and_counts_as_spent(
    fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe)
    with httpx.Client(auth=PaymentAuth(agent)) as client:
        response = client.get(f"{seller.base}/boom")
    # The app's own error, handed back; the seller charged before the app ran and refunded.
    assert (response.status_code, response.text) == (500, "broken")
    [intent] = fake.intents.values()
    [refund] = fake.refunds.values()
    assert refund["payment_intent"] == intent["id"]
    # The agent cannot know about the refund: it counts the payment, never less than spent.
    spent = agent.budget.spent(now=int(time.time()))
    assert (spent.total_committed, spent.total_reserved) == (50 * CENTS, 0)


# --- choosing the rail ---------------------------------------------------------------------------


def test_an_agent_with_both_prefers_x402_unless_told_otherwise(
    chain: DevChain, fake: FakeStripe, seller: Seller, agent_stripe: Any
) -> None:
    payer = fund(chain)
    wallet = CardWallet(agent_stripe, "pm_card_visa")
    budget = Budget.from_prices(None, per_request="$1")
    agent = Agent(payer, budget=budget, card=wallet)
    with httpx.Client(auth=PaymentAuth(agent)) as client:
        response = client.get(f"{seller.base}/report")
    assert response.status_code == 200
    assert response.extensions[PAYMENT_EXTENSION].rail == "x402"
    assert fake.posts(ISSUED_TOKENS_PATH) == []
    assert fake.intents == {}

    by_card = Agent(payer, budget=budget, card=wallet, prefer=("stripe", "x402"))
    with httpx.Client(auth=PaymentAuth(by_card)) as client:
        response = client.get(f"{seller.base}/report")
    assert response.status_code == 200
    assert response.extensions[PAYMENT_EXTENSION].rail == "stripe"
    assert len(fake.posts(ISSUED_TOKENS_PATH)) == 1


def challenge_for(amount: int, currency: str, *, method: str = "stripe") -> mpp.Challenge:
    details = mpp.StripeDetails("profile_x").to_json()
    request = mpp.ChargeRequest(amount=amount, currency=currency, method_details=details)
    return mpp.Challenge(
        id="ch1", realm="api.test", method=method, request=request, expires="2999-01-01T00:00:00Z"
    )


def test_card_choice_follows_the_budget_currency(agent_stripe: Any) -> None:
    wallet = CardWallet(agent_stripe, "pm_card_visa")
    usd = Agent(card=wallet, budget=Budget.from_prices(None, per_request="$1"))
    cheap, dear = challenge_for(60, "usd"), challenge_for(40, "usd")
    assert usd.choose_card([cheap, dear, challenge_for(10, "eur")]) is dear
    with pytest.raises(PaymentError) as caught:
        usd.choose_card([challenge_for(10, "eur"), challenge_for(10, "xyz")])
    assert caught.value.code == "no_payable_offer"
    assert "EUR is not USD" in caught.value.message
    assert "unknown currency" in caught.value.message
    with pytest.raises(PaymentError):
        usd.choose_card([challenge_for(10, "usd", method="tempo")])
    yen = Agent(
        card=wallet, budget=Budget.from_prices(None, per_request="1000 JPY", currency="JPY")
    )
    assert yen.choose_card([challenge_for(500, "jpy")]).request.amount == 500


def test_card_choice_follows_the_policy(agent_stripe: Any) -> None:
    wallet = CardWallet(agent_stripe, "pm_card_visa")
    budget = Budget.from_prices(None, per_request="$1")
    allowed = Agent(card=wallet, budget=budget, policy=Policy.build(payees=["profile_x"]))
    assert allowed.choose_card([challenge_for(10, "usd")]).request.amount == 10
    for policy, why in (
        (Policy.build(payees=["profile_other"]), "payee profile_x is not allowed"),
        (Policy.build(networks=["eip155:8453"]), "network stripe"),
    ):
        agent = Agent(card=wallet, budget=budget, policy=policy)
        with pytest.raises(PaymentError) as caught:
            agent.choose_card([challenge_for(10, "usd")])
        assert caught.value.code == "no_payable_offer"
        assert why in caught.value.message
    by_card = Agent(card=wallet, budget=budget, policy=Policy.build(networks=["stripe"]))
    assert by_card.choose_card([challenge_for(10, "usd")]).request.amount == 10


def test_fiat_amounts_in_budget_units_exactly() -> None:
    assert fiat_to_units(150, "usd") == 150 * 10**16
    assert fiat_to_units(500, "JPY") == 500 * 10**18
    assert fiat_to_units(1_500, "kwd") == 1_500 * 10**15
    for currency in ("xyz", "huf"):
        with pytest.raises(PaymentError) as caught:
            fiat_to_units(1, currency)
        assert caught.value.code == "policy_refused"
    budget = Budget.from_prices(None, per_request="$1")
    with pytest.raises(PaymentError) as caught:
        budget.reserve(10, currency="eur", now=0)
    assert caught.value.code == "policy_refused"
    reservation = budget.reserve(99, currency="usd", now=0)
    assert (reservation.amount, reservation.asset) == (99 * CENTS, "iso4217:USD")
    with pytest.raises(ConfigError):
        budget.reserve(10, now=0)


def test_an_agent_needs_a_way_to_pay() -> None:
    with pytest.raises(ConfigError):
        Agent()
    with pytest.raises(ConfigError):
        Agent(EvmAccount.generate(), prefer=("paypal",))


def test_the_wallet_never_shows_its_key(agent_stripe: Any) -> None:
    wallet = CardWallet(agent_stripe, "pm_card_visa", label="ops")
    assert AGENT_KEY not in repr(wallet)
    with pytest.raises(ConfigError):
        CardWallet(agent_stripe, "not-a-payment-method")
