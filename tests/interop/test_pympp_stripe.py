"""Card payments with the official MPP SDK (``pympp`` 0.16.0, import name ``mpp``), both ways.

(a) pympp's Stripe client pays a farebox route (the gate's card rail); its ``create_token``
callback mints the Shared Payment Token with an agent key. (b) The farebox agent pays a pympp
server (pympp's Stripe ``charge`` method behind its ``pay`` decorator in a Starlette app). Both run
over real HTTP on 127.0.0.1 against ``tests/support/fake_stripe.py``, a FAKE that follows Stripe's
documented API (Stripe cannot be reached from here): the same fake for the agent's mint and the
seller's charge.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest

from farebox.agent.agent import PaymentFailed
from farebox.agent.card import ISSUED_TOKENS_PATH
from farebox.agent.httpx_auth import PAYMENT_EXTENSION, PaymentAuth
from farebox.agent.requests_adapter import PaymentSession
from farebox.protocol import mpp as codec
from tests.support.fake_stripe import AGENT_KEY, FakeStripe
from tests.support.servers import serve

pympp = pytest.importorskip("mpp", reason="pympp (a dev dependency) is not installed")
stripe = pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")

from mpp import Receipt  # noqa: E402
from mpp.client import Mpp as MppClient  # noqa: E402
from mpp.methods.stripe import client as stripe_client  # noqa: E402
from mpp.methods.stripe import server as stripe_server  # noqa: E402
from mpp.methods.stripe.client import OnChallengeParameters  # noqa: E402
from mpp.server import Mpp as MppServer  # noqa: E402
from mpp.server import pay  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from farebox.ledgers.stripe import STRIPE_PREVIEW_VERSION  # noqa: E402
from tests.support.card_seller import CENTS, INTENTS, Seller, card_agent  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning"),
]


# --- a. pympp's Stripe client pays a farebox route -----------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_pympp_client_pays_a_farebox_card_route(
    fake: FakeStripe, seller: Seller, anyio_backend: str
) -> None:
    minted: list[OnChallengeParameters] = []

    async def create_token(params: OnChallengeParameters) -> str:
        # What an agent's backend does: mint with its own key, limited to the challenge.
        minted.append(params)
        form = {
            "payment_method": params.payment_method,
            "usage_limits[currency]": params.currency,
            "usage_limits[max_amount]": params.amount,
            "usage_limits[expires_at]": str(params.expires_at),
            "seller_details[network_business_profile]": params.network_id,
        }
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                fake.url + ISSUED_TOKENS_PATH,
                data=form,
                headers={
                    "Authorization": f"Bearer {AGENT_KEY}",
                    "Stripe-Version": STRIPE_PREVIEW_VERSION,
                },
            )
        assert answer.status_code == 200, answer.text
        token: str = answer.json()["id"]
        return token

    method = stripe_client.charge(create_token=create_token, payment_method="pm_card_visa")
    async with MppClient(methods=[method]) as client:
        response = await client.fetch(f"{seller.base}/report")
    assert response.status_code == 200, response.text
    assert response.text == "the goods"

    [params] = minted
    assert (params.amount, params.currency, params.network_id) == ("50", "usd", fake.profile)
    [intent] = fake.intents.values()
    assert (intent["amount"], intent["currency"], intent["status"]) == (50, "usd", "succeeded")
    assert intent["metadata"] == {
        "farebox_route": "GET /report",
        "mpp_challenge_id": params.challenge.id,
    }
    assert len(fake.posts(INTENTS)) == 1
    [mint] = fake.posts(ISSUED_TOKENS_PATH)
    [charge] = fake.posts(INTENTS)
    assert charge.fields["shared_payment_granted_token"] == next(iter(fake.issued_tokens))
    assert mint.headers["authorization"] == f"Bearer {AGENT_KEY}"

    receipt = Receipt.from_payment_receipt(response.headers["payment-receipt"])
    assert (receipt.status, receipt.method, receipt.reference) == (
        "success",
        "stripe",
        intent["id"],
    )


# --- b. the farebox agent pays a pympp server ----------------------------------------------------


@contextmanager
def pympp_seller(fake: FakeStripe) -> Iterator[str]:
    """pympp's Stripe charge (``GET /report`` at $0.50) in Starlette, charging through the fake."""
    http_client = stripe.HTTPXClient()
    seller_stripe = stripe.StripeClient(
        fake.api_key,
        base_addresses={"api": fake.url},
        max_network_retries=0,
        http_client=http_client,
    )
    server = MppServer(
        methods=stripe_server.charge(network_id=fake.profile, client=seller_stripe, currency="usd"),
        realm="127.0.0.1",
        secret_key="s" * 32,
    )

    @pay(server.charge(amount="0.50"))
    async def report(request: Request, credential: Any, receipt: Any) -> JSONResponse:
        return JSONResponse({"report": "quarterly"})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # The seller's Stripe connections live in uvicorn's loop: closed there.
        await http_client.close_async()

    app = Starlette(routes=[Route("/report", report)], lifespan=lifespan)
    with serve(app) as base:
        yield base


def test_the_farebox_agent_pays_a_pympp_server(fake: FakeStripe, agent_stripe: Any) -> None:
    agent = card_agent(agent_stripe)
    with pympp_seller(fake) as base, httpx.Client(auth=PaymentAuth(agent)) as client:
        response = client.get(f"{base}/report")
    assert response.status_code == 200, response.text
    assert response.json() == {"report": "quarterly"}
    payment = response.extensions[PAYMENT_EXTENSION]
    [intent] = fake.intents.values()
    assert (intent["amount"], intent["currency"], intent["status"]) == (50, "usd", "succeeded")
    assert intent["metadata"]["mpp_sdk"] == "pympp/0.16.0"
    assert payment.rail == "stripe"
    assert payment.payment_receipt is not None
    assert payment.payment_receipt.reference == intent["id"]
    assert payment.settlement.transaction == intent["id"]
    assert payment.receipt is None  # pympp signs no PEAC record
    mpp_receipt = codec.parse_payment_receipt(response.headers["payment-receipt"])
    assert (mpp_receipt.method, mpp_receipt.reference) == ("stripe", intent["id"])

    [mint] = fake.posts(ISSUED_TOKENS_PATH)
    fields = mint.fields
    assert fields["usage_limits[max_amount]"] == "50"
    assert fields["usage_limits[currency]"] == "usd"
    assert fields["seller_details[network_business_profile]"] == fake.profile
    assert int(fields["usage_limits[expires_at]"]) > time.time()
    spent = agent.budget.spent(now=int(time.time()))
    assert (spent.total_committed, spent.total_reserved) == (50 * CENTS, 0)
    assert agent.book is not None
    [entry] = agent.book.entries()
    assert (entry.transaction, entry.network, entry.amount) == (intent["id"], "stripe", 50)


def test_the_farebox_agent_pays_a_pympp_server_with_requests(
    fake: FakeStripe, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe)
    with pympp_seller(fake) as base, PaymentSession(agent) as session:
        response = session.get(f"{base}/report")
        again = session.get(f"{base}/report")
    assert (response.status_code, again.status_code) == (200, 200)
    # Two requests, two challenges, two tokens, two charges: nothing is reused.
    assert len(fake.posts(ISSUED_TOKENS_PATH)) == 2
    assert [i["status"] for i in fake.intents.values()] == ["succeeded", "succeeded"]
    spent = agent.budget.spent(now=int(time.time()))
    assert spent.total_committed == 100 * CENTS


def test_a_pympp_refusal_fails_with_its_problem_type_and_releases(
    fake: FakeStripe, agent_stripe: Any
) -> None:
    agent = card_agent(agent_stripe, payment_method="pm_card_chargeDeclined")
    with (
        pympp_seller(fake) as base,
        httpx.Client(auth=PaymentAuth(agent)) as client,
        pytest.raises(PaymentFailed) as caught,
    ):
        client.get(f"{base}/report")
    assert caught.value.status == 402
    assert caught.value.code == "verification-failed"  # the MPP problem type pympp answers with
    assert [i["status"] for i in fake.intents.values()] == ["requires_payment_method"]
    spent = agent.budget.spent(now=int(time.time()))
    assert (spent.total_committed, spent.total_reserved) == (0, 0)
