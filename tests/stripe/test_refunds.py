"""Card refunds (``farebox.server.refunds``): against localstripe (real refunds of real PaymentIntents)
and, for the exact wire request and Stripe's idempotent replay, against ``fake_stripe`` (a FAKE that
follows Stripe's documented API; Stripe cannot be reached from here).

Card payments are recorded in a real SQLite store the way the card rail records them (a
``settlement`` event and a ``receipt`` event holding the signed PEAC record): localstripe has no
Shared Payment Tokens, so the rail itself cannot charge there.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from farebox.cli import app as cli_app
from farebox.dev.devchain import DevChain
from farebox.errors import PaymentError
from farebox.receipts import (
    SigningKey,
    issue_receipt,
    payment_claims,
    rfc3339,
    save_signing_key,
    uuid7,
)
from farebox.receipts.records import COMMERCE_EXTENSION, receipt_ref, verify_receipt
from farebox.server.refunds import (
    CORRELATION_EXTENSION,
    LOCK_PREFIX,
    RefundResult,
    refund_idempotency_key,
    refund_payment,
)
from farebox.store.base import Event
from farebox.store.sqlite import SqliteStore
from tests.support.fake_stripe import FakeStripe

stripe = pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")

from farebox.ledgers.stripe import STRIPE_PREVIEW_VERSION, StripeLedger  # noqa: E402
from tests.support.asgi import call  # noqa: E402
from tests.support.cards import Clock, authorization, offered, one  # noqa: E402
from tests.support.cards import card_gate as card_setup  # noqa: E402
from tests.support.gates import ISSUER as GATE_ISSUER  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    # stripe 16.1's HTTPXClient hands httpx the form body as ``data=<bytes>`` (deprecated in 0.28).
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning"),
]

AMOUNT = 500
ROUTE = "GET /report"
SUB = "https://api.test/report"
KEY = SigningKey.from_seed(b"r" * 32)
ISSUER = KEY.did_key


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def async_client(api_key: str, url: str) -> tuple[Any, Any]:
    http_client = stripe.HTTPXClient()
    client = stripe.StripeClient(
        api_key, base_addresses={"api": url}, max_network_retries=0, http_client=http_client
    )
    return client, http_client


@pytest.fixture
async def store(tmp_path: Path, anyio_backend: str) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "payments.sqlite")
    yield opened
    await opened.aclose()


@pytest.fixture
async def ledger(localstripe: Any, stripe_client: Any, anyio_backend: str) -> AsyncIterator[Any]:
    """A ledger on localstripe (cleared by ``stripe_client``, which the tests use to pay)."""
    from tests.support.localstripe import API_KEY

    client, http_client = async_client(API_KEY, localstripe.url)
    yield StripeLedger(client)
    await http_client.close_async()


def pay(client: Any, amount: int = AMOUNT) -> str:
    """A succeeded PaymentIntent on localstripe."""
    intent = client.v1.payment_intents.create(
        params={
            "amount": amount,
            "currency": "usd",
            "payment_method_types": ["card"],
            "payment_method": "pm_card_visa",
            "confirm": True,
        }
    )
    assert intent.status == "succeeded"
    return str(intent.id)


def stripe_refunds(client: Any, intent: str) -> list[Any]:
    return list(client.v1.refunds.list(params={"payment_intent": intent}).data)


async def record_payment(
    store: SqliteStore,
    intent: str,
    *,
    amount: int = AMOUNT,
    rail: str = "stripe",
    key: SigningKey = KEY,
) -> str:
    """Log a settled payment as the card rail does; its record's receipt_ref."""
    now = int(time.time())
    jws = issue_receipt(
        payment_claims(
            iss=key.did_key,
            iat=now,
            jti=uuid7(now * 1000),
            payment_rail=rail,
            amount_minor=amount,
            currency="USD",
            event="settlement",
            reference=intent,
            sub=SUB,
            occurred_at=rfc3339(now),
        ),
        key,
    ).jws
    ref = receipt_ref(jws)
    await store.append(
        Event(
            "settlement",
            now,
            ROUTE,
            reference=intent,
            data={"success": True, "rail": rail, "amount": str(amount), "currency": "usd"},
        ),
        Event("receipt", now, ROUTE, reference=ref, data={"transaction": intent, "jws": jws}),
    )
    return ref


async def refund(store: Any, ledger: StripeLedger, ref: str, **kwargs: Any) -> RefundResult:
    return await refund_payment(
        store, ledger, receipt_ref=ref, signing_key=KEY, issuer=ISSUER, **kwargs
    )


async def refused(code: str, call: Any) -> PaymentError:
    with pytest.raises(PaymentError) as caught:
        await call
    assert caught.value.code == code, caught.value
    return caught.value


def original_jti(store_jws: str) -> str:
    return str(verify_receipt(store_jws, KEY.public_key, now=int(time.time())).claims["jti"])


# --- localstripe ---------------------------------------------------------------------------------


async def test_full_refund_is_recorded_with_a_linked_negative_record(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any
) -> None:
    intent = pay(stripe_client)
    ref = await record_payment(store, intent)
    result = await refund(store, ledger, ref, reason="requested_by_customer")
    assert (result.amount, result.refunded, result.remaining) == (AMOUNT, AMOUNT, 0)
    assert (result.payment_intent, result.currency, result.status) == (intent, "usd", "succeeded")
    [made] = stripe_refunds(stripe_client, intent)
    assert made.id == result.refund
    assert made.amount == AMOUNT
    assert made.metadata.to_dict() == {
        "farebox_receipt": ref,
        "farebox_reason": "requested_by_customer",
    }

    record = verify_receipt(result.record, KEY.public_key, now=int(time.time()), issuer=ISSUER)
    assert record.warnings == ()
    assert result.record_ref == receipt_ref(result.record)
    claims = record.claims
    assert claims["type"] == "org.peacprotocol/payment"
    assert claims["sub"] == SUB
    assert claims["extensions"][COMMERCE_EXTENSION] == {
        "payment_rail": "stripe",
        "amount_minor": f"-{AMOUNT}",
        "currency": "USD",
        "event": "refund",
        "reference": result.refund,
    }
    [original] = await store.events(kind="receipt", reference=ref)
    link = claims["extensions"][CORRELATION_EXTENSION]
    assert link == {"parent_jti": original_jti(original.data["jws"])}

    [logged] = await store.events(kind="refund", reference=ref)
    assert logged.route == ROUTE
    assert dict(logged.data) == {
        "rail": "stripe",
        "refund": result.refund,
        "transaction": intent,
        "amount": str(AMOUNT),
        "currency": "usd",
        "status": "succeeded",
        "reason": "requested_by_customer",
        "record": result.record_ref,
    }
    [receipt] = await store.events(kind="receipt", reference=result.record_ref)
    assert dict(receipt.data) == {"transaction": result.refund, "jws": result.record}
    # The lock is gone: nothing is left held.
    assert await store.get_claim(LOCK_PREFIX + ref) is None


async def test_partial_refunds_then_the_rest_then_nothing(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any
) -> None:
    intent = pay(stripe_client)
    ref = await record_payment(store, intent)
    first = await refund(store, ledger, ref, amount=150)
    assert (first.amount, first.refunded, first.remaining) == (150, 150, AMOUNT - 150)
    second = await refund(store, ledger, ref, amount=100)
    assert (second.refunded, second.remaining) == (250, AMOUNT - 250)
    rest = await refund(store, ledger, ref)
    assert (rest.amount, rest.refunded, rest.remaining) == (AMOUNT - 250, AMOUNT, 0)
    amounts = sorted(r.amount for r in stripe_refunds(stripe_client, intent))
    assert amounts == sorted([150, 100, AMOUNT - 250])
    assert len({first.refund, second.refund, rest.refund}) == 3
    for made in (first, second, rest):
        claims = verify_receipt(made.record, KEY.public_key, now=int(time.time())).claims
        assert claims["extensions"][COMMERCE_EXTENSION]["amount_minor"] == f"-{made.amount}"

    error = await refused("refund_refused", refund(store, ledger, ref))
    assert "fully refunded" in error.message
    await refused("refund_refused", refund(store, ledger, ref, amount=1))
    assert len(stripe_refunds(stripe_client, intent)) == 3
    assert len(await store.events(kind="refund", reference=ref)) == 3


@pytest.mark.parametrize("amount", [AMOUNT + 1, 0, -5], ids=["more", "zero", "negative"])
async def test_refused_by_farebox_before_stripe(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any, amount: int
) -> None:
    # localstripe would accept an over-refund: farebox must refuse it on its own.
    intent = pay(stripe_client)
    ref = await record_payment(store, intent)
    await refused("refund_refused", refund(store, ledger, ref, amount=amount))
    assert stripe_refunds(stripe_client, intent) == []
    assert await store.events(kind="refund") == []
    assert await store.get_claim(LOCK_PREFIX + ref) is None


async def test_over_refund_after_a_partial_one(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any
) -> None:
    intent = pay(stripe_client)
    ref = await record_payment(store, intent)
    await refund(store, ledger, ref, amount=AMOUNT - 10)
    error = await refused("refund_refused", refund(store, ledger, ref, amount=11))
    assert "10 left" in error.message
    assert len(stripe_refunds(stripe_client, intent)) == 1


async def test_unknown_reference_and_unknown_reason(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any
) -> None:
    missing = "sha256:" + "0" * 64
    error = await refused("receipt_not_found", refund(store, ledger, missing))
    assert error.status == 404
    await refused("receipt_not_found", refund(store, ledger, "pi_notareceiptref"))
    intent = pay(stripe_client)
    ref = await record_payment(store, intent)
    await refused("refund_refused", refund(store, ledger, ref, reason="because"))
    assert stripe_refunds(stripe_client, intent) == []


async def test_an_x402_record_is_not_refunded(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any
) -> None:
    intent = pay(stripe_client)
    ref = await record_payment(store, intent, rail="x402")
    error = await refused("refund_refused", refund(store, ledger, ref))
    assert "not a card payment" in error.message
    assert stripe_refunds(stripe_client, intent) == []


async def test_a_refund_record_is_not_refunded(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any
) -> None:
    intent = pay(stripe_client)
    ref = await record_payment(store, intent)
    done = await refund(store, ledger, ref, amount=100)
    await refused("refund_refused", refund(store, ledger, done.record_ref))
    assert len(stripe_refunds(stripe_client, intent)) == 1


async def test_a_record_signed_by_another_key_is_refused(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any
) -> None:
    intent = pay(stripe_client)
    ref = await record_payment(store, intent, key=SigningKey.from_seed(b"o" * 32))
    await refused("receipt_invalid", refund(store, ledger, ref))
    assert stripe_refunds(stripe_client, intent) == []


async def test_concurrent_refunds_of_everything_one_succeeds(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any
) -> None:
    intent = pay(stripe_client)
    ref = await record_payment(store, intent)
    outcomes: list[RefundResult | PaymentError] = []

    async def attempt() -> None:
        try:
            outcomes.append(await refund(store, ledger, ref))
        except PaymentError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(attempt)
        tasks.start_soon(attempt)
    done = [o for o in outcomes if isinstance(o, RefundResult)]
    failed = [o for o in outcomes if isinstance(o, PaymentError)]
    assert len(done) == 1
    assert done[0].amount == AMOUNT
    assert [f.code for f in failed] in (["refund_in_progress"], ["refund_refused"])
    assert len(stripe_refunds(stripe_client, intent)) == 1
    assert len(await store.events(kind="refund", reference=ref)) == 1


async def test_a_stale_lock_is_taken_over_a_fresh_one_is_not(
    store: SqliteStore, ledger: StripeLedger, stripe_client: Any
) -> None:
    intent = pay(stripe_client)
    ref = await record_payment(store, intent)
    now = int(time.time())
    assert await store.claim(LOCK_PREFIX + ref, owner="other", now=now - 10) is not None
    await refused("refund_in_progress", refund(store, ledger, ref))
    assert stripe_refunds(stripe_client, intent) == []
    # The same lock, seen 10 minutes later: its process is taken to have died.
    later = await refund(store, ledger, ref, clock=lambda: now + 600)
    assert later.amount == AMOUNT
    assert await store.get_claim(LOCK_PREFIX + ref) is None


# --- the fake: the wire request and Stripe's idempotent replay -----------------------------------


@pytest.fixture
async def fake_ledger(fake: FakeStripe, anyio_backend: str) -> AsyncIterator[StripeLedger]:
    client, http_client = async_client(fake.api_key, fake.url)
    yield StripeLedger(client)
    await http_client.close_async()


async def fake_payment(ledger: StripeLedger) -> str:
    charged = await ledger.charge(
        spt="spt_succeeds", amount=AMOUNT, currency="usd", challenge_id="c" * 22, metadata={}
    )
    return charged.payment_intent


async def test_wire_request_field_by_field(
    store: SqliteStore, fake_ledger: StripeLedger, fake: FakeStripe
) -> None:
    intent = await fake_payment(fake_ledger)
    ref = await record_payment(store, intent)
    result = await refund(store, fake_ledger, ref, amount=120, reason="duplicate")
    [request] = fake.posts("/v1/refunds")
    assert request.fields == {
        "payment_intent": intent,
        "amount": "120",
        "metadata[farebox_receipt]": ref,
        "metadata[farebox_reason]": "duplicate",
    }
    assert request.headers["idempotency-key"] == refund_idempotency_key(ref, 0, 120)
    assert request.headers["stripe-version"] == STRIPE_PREVIEW_VERSION
    assert result.refund in fake.refunds

    await refund(store, fake_ledger, ref)
    second = fake.posts("/v1/refunds")[1]
    # "Everything left" is sent as the exact amount farebox computed, under the next key.
    assert second.fields["amount"] == str(AMOUNT - 120)
    assert second.headers["idempotency-key"] == refund_idempotency_key(ref, 1, AMOUNT - 120)


def test_idempotency_key_names_the_refund() -> None:
    ref = "sha256:" + "a" * 64
    key = refund_idempotency_key(ref, 0, 100)
    assert key.startswith("farebox_refund_")
    assert key == refund_idempotency_key(ref, 0, 100)
    others = {refund_idempotency_key(ref, 1, 100), refund_idempotency_key(ref, 0, 101)}
    assert key not in others
    assert len(others) == 2


class FailingOnce:
    """A store whose first ``append`` fails (the database went away after Stripe refunded)."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def append(self, *events: Event) -> None:
        if not self.failed:
            self.failed = True
            raise PaymentError("store_unavailable", "gone")
        await self._store.append(*events)


async def test_a_retry_after_an_unlogged_refund_never_pays_twice(
    store: SqliteStore, fake_ledger: StripeLedger, fake: FakeStripe
) -> None:
    intent = await fake_payment(fake_ledger)
    ref = await record_payment(store, intent)
    flaky = FailingOnce(store)
    await refused("store_unavailable", refund(flaky, fake_ledger, ref))
    assert await store.events(kind="refund") == []
    assert await store.get_claim(LOCK_PREFIX + ref) is None
    again = await refund(flaky, fake_ledger, ref)
    [made] = fake.refunds.values()
    assert again.refund == made["id"]
    assert again.amount == AMOUNT
    assert len(fake.posts("/v1/refunds")) == 2  # asked twice, refunded once
    assert len(await store.events(kind="refund", reference=ref)) == 1


async def test_stripe_refusal_is_passed_on_and_logs_nothing(
    store: SqliteStore, fake_ledger: StripeLedger, fake: FakeStripe
) -> None:
    intent = await fake_payment(fake_ledger)
    ref = await record_payment(store, intent)
    # Refunded outside farebox (the Dashboard, say): farebox's log does not know, Stripe does.
    await fake_ledger.refund(intent, AMOUNT - 1)
    error = await refused("refund_refused", refund(store, fake_ledger, ref, amount=2))
    assert "amount_too_large" in error.message
    assert await store.events(kind="refund") == []
    assert json.dumps(error.message).count("sk_") == 0


# --- farebox refund (the command, in process, against localstripe) ------------------------------


def write_config(tmp_path: Path, api_base: str) -> Path:
    save_signing_key(KEY, tmp_path / "receipts.key")
    path = tmp_path / "farebox.toml"
    path.write_text(
        "[server]\n"
        'store = "payments.sqlite"\n'
        'receipt_key = "receipts.key"\n'
        "[payment]\n"
        'network = "devchain"\n'
        'pay_to = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"\n'
        "[settlement]\n"
        'ledger = "embedded"\n'
        "[[routes]]\n"
        'path = "/report"\n'
        'price = "$5.00"\n'
        "card = true\n"
        "[card]\n"
        'network_id = "profile_test_farebox"\n'
        'secret_key_env = "FAREBOX_TEST_STRIPE_KEY"\n'
        f'api_base = "{api_base}"\n'
    )
    return path


def test_the_refund_command(localstripe: Any, stripe_client: Any, tmp_path: Path) -> None:
    from tests.support.localstripe import API_KEY

    intent = pay(stripe_client)
    config = write_config(tmp_path, localstripe.url)

    async def record() -> str:
        store = SqliteStore(tmp_path / "payments.sqlite")
        try:
            return await record_payment(store, intent)
        finally:
            await store.aclose()

    ref = anyio.run(record)
    env = {"FAREBOX_TEST_STRIPE_KEY": API_KEY, "FAREBOX_CARD_SECRET": None}
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(cli_app, ["refund", ref, "--config", str(config), *args], env=env)

    part = run("--amount", "200", "--reason", "requested_by_customer", "--json")
    assert part.exit_code == 0, part.stderr
    shown = json.loads(part.stdout)
    assert (shown["amount"], shown["refunded"], shown["remaining"]) == (200, 200, AMOUNT - 200)
    assert shown["payment_intent"] == intent
    claims = verify_receipt(shown["record"], KEY.public_key, now=int(time.time())).claims
    assert claims["extensions"][COMMERCE_EXTENSION]["amount_minor"] == "-200"
    assert claims["extensions"][COMMERCE_EXTENSION]["reference"] == shown["refund"]

    rest = run()
    assert rest.exit_code == 0, rest.stderr
    assert f"refunded    {AMOUNT - 200} USD" in rest.stdout
    assert "remaining   0 USD" in rest.stdout
    assert "record      ey" in rest.stdout
    assert sorted(r.amount for r in stripe_refunds(stripe_client, intent)) == [200, AMOUNT - 200]

    done = run("--amount", "1")
    assert done.exit_code == 1
    assert done.stderr.startswith("refund_refused: ")
    unknown = runner.invoke(
        cli_app, ["refund", "sha256:" + "0" * 64, "--config", str(config)], env=env
    )
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("receipt_not_found: ")
    for result in (part, rest, done, unknown):
        assert API_KEY not in result.stdout + result.stderr
    assert len(stripe_refunds(stripe_client, intent)) == 2


def test_the_refund_command_names_config_problems(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9")
    ref = "sha256:" + "0" * 64
    result = CliRunner().invoke(
        cli_app,
        ["refund", ref, "--config", str(config)],
        env={"FAREBOX_TEST_STRIPE_KEY": None, "FAREBOX_CARD_SECRET": None},
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "E_CONFIG: card.secret_key_env: environment variable FAREBOX_TEST_STRIPE_KEY"
    )
    config.write_text(config.read_text().split("[card]")[0].replace("card = true\n", ""))
    result = CliRunner().invoke(cli_app, ["refund", ref, "--config", str(config)])
    assert result.exit_code == 1
    assert result.stderr.startswith("E_CONFIG: card: no [card] section")


# --- a card payment made through the gate, then refunded ----------------------------------------


async def test_refund_of_a_payment_the_gate_took(
    chain: DevChain, fake_ledger: StripeLedger, fake: FakeStripe
) -> None:
    paid, asgi = card_setup(chain, fake_ledger, Clock())
    [challenge] = await offered(asgi, "/report")
    [start, _] = await call(asgi, "/report", [authorization(challenge, "spt_succeeds_7")])
    assert start["status"] == 200
    record = one(start, "peac-receipt")
    [intent] = fake.intents.values()

    result = await refund_payment(
        paid.store,
        fake_ledger,
        receipt_ref=receipt_ref(record),
        amount=20,
        signing_key=paid.key,
        issuer=GATE_ISSUER,
    )
    assert (result.payment_intent, result.amount, result.remaining) == (intent["id"], 20, 30)
    [request] = fake.posts("/v1/refunds")
    assert request.fields["payment_intent"] == intent["id"]
    assert request.fields["amount"] == "20"
    original = verify_receipt(record, paid.key.public_key, now=int(time.time())).claims
    refunded = verify_receipt(
        result.record, paid.key.public_key, now=int(time.time()), issuer=GATE_ISSUER
    ).claims
    assert refunded["sub"] == original["sub"]
    assert refunded["extensions"][CORRELATION_EXTENSION] == {"parent_jti": original["jti"]}
    assert refunded["extensions"][COMMERCE_EXTENSION]["amount_minor"] == "-20"
    rest = await refund_payment(
        paid.store,
        fake_ledger,
        receipt_ref=receipt_ref(record),
        signing_key=paid.key,
        issuer=GATE_ISSUER,
    )
    assert (rest.amount, rest.remaining) == (30, 0)
    [charge] = fake.charges.values()
    assert charge["refunded"] is True
