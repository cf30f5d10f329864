"""The command line, as a user runs it: ``farebox demo --serve`` in one process, ``farebox get``
paying it from another, with a budget file and a receipt book."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.protocol.models import Offer
from tests.support.chain import send_usdc
from tests.support.fastapi_app import fastapi_app
from tests.support.gates import PRICE, make_gate
from tests.support.processes import DEV_KEYS, FAREBOX
from tests.support.servers import free_port, serve, wait_for


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [*FAREBOX, "demo", "--serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/health")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def farebox_get(*args: str, key: str = DEV_KEYS[3]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FAREBOX_PRIVATE_KEY=key)
    return subprocess.run(
        [*FAREBOX, "get", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_get_pays_the_demo_server_within_its_budget(demo_server: str, tmp_path: Path) -> None:
    assert httpx.get(demo_server + "/weather").status_code == 402
    budget, book = str(tmp_path / "budget.sqlite"), str(tmp_path / "book.sqlite")
    common = ("--budget-file", budget, "--per-day", "$0.02", "--book", book)
    first = farebox_get(demo_server + "/weather", *common)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["forecast"] == "sunny"
    payment = json.loads(first.stderr[first.stderr.index("{") :])
    assert payment["paid"] == "0.01 USDC"
    assert payment["transaction"].startswith("0x")
    assert payment["receipt_verified"] is True
    assert DEV_KEYS[3][2:] not in first.stdout + first.stderr  # the key is never printed
    assert farebox_get(demo_server + "/weather", *common).returncode == 0
    refused = farebox_get(demo_server + "/weather", *common)  # a third cent: over the day's limit
    assert refused.returncode == 1
    assert "budget_exceeded" in refused.stderr
    too_dear = farebox_get(demo_server + "/weather", "--max", "$0.001")
    assert too_dear.returncode == 1
    assert "budget_exceeded" in too_dear.stderr


def test_get_without_a_key_or_funds(demo_server: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FAREBOX_PRIVATE_KEY"}
    no_key = subprocess.run(
        [*FAREBOX, "get", demo_server + "/weather"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert no_key.returncode == 1
    assert "FAREBOX_PRIVATE_KEY" in no_key.stderr
    broke = farebox_get(demo_server + "/weather", key="0x" + "7" * 64)
    assert broke.returncode == 1
    assert "invalid_exact_evm_insufficient_balance" in broke.stderr
    free = farebox_get(demo_server + "/health")
    assert free.returncode == 0
    assert json.loads(free.stdout) == {"ok": True}


def test_serve_settles_through_a_facilitator_process(tmp_path: Path) -> None:
    """Four processes, as an operator runs them: a node (`farebox devchain`), a facilitator on it
    (`farebox facilitator`), a config-driven paid API settling through it (`farebox serve`, told
    where by X402_FACILITATOR_URL), and an agent (`farebox get`)."""
    from tests.support.processes import balance, rpc

    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> None:
        processes.append(
            subprocess.Popen(
                [*FAREBOX, *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dict(os.environ, **(env or {})),
            )
        )

    node_port, facilitator_port, api_port = free_port(), free_port(), free_port()
    node = f"http://127.0.0.1:{node_port}"
    facilitator = f"http://127.0.0.1:{facilitator_port}"
    api = f"http://127.0.0.1:{api_port}"
    key_file = tmp_path / "settler.key"
    key_file.write_text(DEV_KEYS[1])
    merchant = "0x" + "5a" * 20
    config = tmp_path / "api.toml"
    config.write_text(
        "[server]\nstore = 'payments.sqlite'\n"
        f"[payment]\nnetwork = 'devchain'\npay_to = '{merchant}'\n"
        "[[routes]]\npath = '/weather'\nprice = '$0.01'\ncontent = '{\"forecast\": \"fog\"}'\n"
    )
    try:
        start("devchain", "--port", str(node_port))
        wait_for(node, {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
        start(
            "facilitator",
            "--ledger",
            node,
            "--key",
            str(key_file),
            "--port",
            str(facilitator_port),
            "--store",
            str(tmp_path / "facilitator.sqlite"),
        )
        wait_for(facilitator + "/supported")
        start(
            "serve", str(config), "--port", str(api_port), env={"X402_FACILITATOR_URL": facilitator}
        )
        wait_for(api + "/health")
        supported = httpx.get(facilitator + "/supported").json()
        assert any(kind["network"] == "eip155:131277322940537" for kind in supported["kinds"])
        paid = farebox_get(api + "/weather")
        assert paid.returncode == 0, paid.stderr
        assert json.loads(paid.stdout) == {"forecast": "fog"}
        transaction = json.loads(paid.stderr[paid.stderr.index("{") :])["transaction"]
        receipt = rpc(node, "eth_getTransactionReceipt", transaction)
        assert isinstance(receipt, dict)
        assert receipt["status"] == "0x1"
        token = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
        assert balance(node, token, merchant) == 10_000
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=10)


def _weather_offer() -> Offer:
    """What the reconcile tests' configs charge for /weather: $0.01 in the embedded chain's USDC,
    paid to 0x5b...5b."""
    from farebox.money import DEVCHAIN_USDC as USDC

    extra = {"name": USDC.name, "version": USDC.version}
    return Offer("exact", USDC.network, 10_000, USDC.address, "0x" + "5b" * 20, extra=extra)


def test_reconcile_settles_what_a_dead_server_left_unrecorded(tmp_path: Path) -> None:
    """A server claimed a proof and the money moved, then it died before recording anything:
    `farebox reconcile` finds the transaction on the chain and records the payment as settled."""
    import time

    import anyio

    from farebox.eth import EvmAccount
    from farebox.ledgers.evm import EvmLedger
    from farebox.ledgers.rpc import HttpRpc
    from farebox.money import DEVCHAIN_USDC as USDC
    from farebox.schemes.evm_exact import make_proof, verify
    from farebox.store.sqlite import SqliteStore

    node_port = free_port()
    node = f"http://127.0.0.1:{node_port}"
    (tmp_path / "settler.key").write_text(DEV_KEYS[1])
    config = tmp_path / "api.toml"
    config.write_text(
        "[server]\nstore = 'payments.sqlite'\n"
        f"[payment]\nnetwork = 'devchain'\npay_to = '0x{'5b' * 20}'\n"
        f"[settlement]\nrpc_url = '{node}'\nsettler_key = 'settler.key'\n"
        "[[routes]]\npath = '/weather'\nprice = '$0.01'\n"
    )
    process = subprocess.Popen(
        [*FAREBOX, "devchain", "--port", str(node_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(node, {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
        offer = _weather_offer()
        now = int(time.time())
        payer = EvmAccount.from_hex(DEV_KEYS[3])
        proof = verify(make_proof(payer, offer, now=now, nonce=os.urandom(32)), offer, now=now)

        async def die_after_settling() -> str:
            store = SqliteStore(tmp_path / "payments.sqlite")
            assert await store.claim(proof.claim_key, owner="dead", now=now - 600)
            ledger = EvmLedger(
                HttpRpc(node), EvmAccount.from_hex(DEV_KEYS[2]), network=USDC.network
            )
            settlement = await ledger.settle(proof)
            await ledger.aclose()
            await store.aclose()
            assert settlement.success
            return settlement.transaction

        transaction = anyio.run(die_after_settling)
        result = subprocess.run(
            [*FAREBOX, "reconcile", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {
            "settled": 1,
            "released": 0,
            "waiting": 0,
            "errors": 0,
            "pruned": 0,
            "traffic_pruned": 0,
        }

        async def recorded() -> tuple[str, str | None]:
            store = SqliteStore(tmp_path / "payments.sqlite")
            claim = await store.get_claim(proof.claim_key)
            await store.aclose()
            assert claim is not None
            return claim.state, claim.transaction

        assert anyio.run(recorded) == ("settled", transaction)
        again = subprocess.run(
            [*FAREBOX, "reconcile", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert json.loads(again.stdout)["settled"] == 0  # nothing left, nothing done twice
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_reconcile_behind_a_facilitator_reads_its_own_node_or_takes_the_operators_word(
    tmp_path: Path,
) -> None:
    """A server settling through a facilitator was left with a pending claim (the facilitator's
    answer was lost; the money moved). With `reconcile_rpc_url` the reconciler reads the chain
    and settles it; without, `--list` shows it and `--settled` records the operator's finding."""
    import time

    import anyio

    from farebox.eth import EvmAccount
    from farebox.ledgers.evm import EvmLedger
    from farebox.ledgers.rpc import HttpRpc
    from farebox.money import DEVCHAIN_USDC as USDC
    from farebox.schemes.evm_exact import make_proof, verify
    from farebox.store.base import Event
    from farebox.store.sqlite import SqliteStore

    node_port = free_port()
    node = f"http://127.0.0.1:{node_port}"
    common = (
        "[server]\nstore = 'payments.sqlite'\n"
        f"[payment]\nnetwork = 'devchain'\npay_to = '0x{'5b' * 20}'\n"
        # Nobody listens there: reconciling never asks the facilitator.
        "[settlement]\nfacilitator = 'http://127.0.0.1:9'\n"
    )
    routes = "[[routes]]\npath = '/weather'\nprice = '$0.01'\n"
    reading = tmp_path / "reading.toml"
    reading.write_text(common + f"reconcile_rpc_url = '{node}'\n" + routes)
    blind = tmp_path / "blind.toml"
    blind.write_text(common + routes)
    process = subprocess.Popen(
        [*FAREBOX, "devchain", "--port", str(node_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def reconcile(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FAREBOX, "reconcile", str(config), *options],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    try:
        wait_for(node, {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
        offer = _weather_offer()
        now = int(time.time())
        payer = EvmAccount.from_hex(DEV_KEYS[3])

        async def pending_payment() -> tuple[str, str]:
            """A payment the facilitator settled whose answer the server never heard."""
            proof = verify(make_proof(payer, offer, now=now, nonce=os.urandom(32)), offer, now=now)
            store = SqliteStore(tmp_path / "payments.sqlite")
            assert await store.claim(proof.claim_key, owner="gate", now=now)
            ledger = EvmLedger(
                HttpRpc(node), EvmAccount.from_hex(DEV_KEYS[2]), network=USDC.network
            )
            settlement = await ledger.settle(proof)
            await ledger.aclose()
            assert settlement.success
            # As the gate records a pending payment: the claim, with its proof's terms logged.
            logged = Event(
                "proof",
                now,
                "GET /weather",
                payer=payer.address,
                data={
                    "claim": proof.claim_key,
                    "pay_to": offer.pay_to,
                    "amount": str(offer.amount),
                    "valid_until": proof.valid_until,
                },
            )
            await store.finish(
                proof.claim_key, owner="gate", state="pending", transaction=None, events=[logged]
            )
            await store.aclose()
            return proof.claim_key, settlement.transaction

        async def claim_of(key: str) -> tuple[str, str | None]:
            store = SqliteStore(tmp_path / "payments.sqlite")
            claim = await store.get_claim(key)
            await store.aclose()
            assert claim is not None
            return claim.state, claim.transaction

        key, transaction = anyio.run(pending_payment)
        blind_pass = reconcile(blind)
        assert blind_pass.returncode == 0, blind_pass.stderr
        assert json.loads(blind_pass.stdout)["waiting"] == 1  # no chain to read: it waits
        read = reconcile(reading)
        assert read.returncode == 0, read.stderr
        assert json.loads(read.stdout)["settled"] == 1
        assert anyio.run(claim_of, key) == ("settled", transaction)

        other, other_transaction = anyio.run(pending_payment)
        listed = reconcile(blind, "--list")
        assert listed.returncode == 0, listed.stderr
        assert [c["key"] for c in json.loads(listed.stdout)] == [other]
        bad = reconcile(blind, "--settled", other, "--transaction", "0x12")
        assert bad.returncode == 1
        assert "E_USAGE" in bad.stderr
        recorded = reconcile(blind, "--settled", other, "--transaction", other_transaction)
        assert recorded.returncode == 0, recorded.stderr
        assert json.loads(recorded.stdout) == {"claim": other, "recorded": True}
        assert anyio.run(claim_of, other) == ("settled", other_transaction)
        # A settled claim is not changed again by anyone's word.
        again = reconcile(blind, "--release", other)
        assert again.returncode == 1
        assert anyio.run(claim_of, other) == ("settled", other_transaction)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning")
def test_serve_takes_cards_through_devstripe(tmp_path: Path) -> None:
    """`farebox devstripe` and `farebox serve examples/card.toml` (pointed at it) in their own
    processes; an agent holding only a card pays over HTTP, then an invoice is paid out of band."""
    stripe = pytest.importorskip("stripe")
    from farebox.agent.agent import Agent
    from farebox.agent.budget import Budget
    from farebox.agent.card import CardWallet
    from farebox.agent.httpx_auth import PAYMENT_EXTENSION, PaymentAuth
    from farebox.dev.devstripe import AGENT_KEY

    stand_in_port, api_port = free_port(), free_port()
    stand_in = f"http://127.0.0.1:{stand_in_port}"
    api = f"http://127.0.0.1:{api_port}"
    example = Path(__file__).parents[2] / "examples" / "card.toml"
    config = tmp_path / "card.toml"
    config.write_text(example.read_text().replace("http://127.0.0.1:12111", stand_in))
    env = dict(os.environ, STRIPE_SECRET_KEY="sk_test_farebox_fake")
    processes = [
        subprocess.Popen(
            [*FAREBOX, "devstripe", "--port", str(stand_in_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [*FAREBOX, "serve", str(config), "--port", str(api_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        ),
    ]
    try:
        wait_for(api + "/weather")
        assert "www-authenticate" not in httpx.get(api + "/weather").headers  # under the minimum
        wallet = CardWallet(
            stripe.StripeClient(AGENT_KEY, base_addresses={"api": stand_in}, max_network_retries=0),
            "pm_card_visa",
        )
        agent = Agent(card=wallet, budget=Budget.from_prices(None, per_request="$1"))
        with httpx.Client(auth=PaymentAuth(agent)) as client:
            paid = client.get(api + "/report")
        assert paid.status_code == 200, paid.text
        assert paid.json() == {"report": "Q3 weather outlook"}
        payment = paid.extensions[PAYMENT_EXTENSION]
        assert payment.rail == "stripe"
        assert payment.settlement.transaction.startswith("pi_")
        assert payment.receipt is not None  # the PEAC record verified

        unpaid = httpx.get(api + "/report").json()["payment"]
        [invoice] = [m for m in unpaid["methods"] if m["protocol"] == "x-receipt"]
        assert unpaid["reference"] == invoice["reference"]
        confirmed = httpx.post(
            f"{stand_in}/v1/payment_intents/{invoice['payment_intent']}/confirm",
            data={"client_secret": invoice["client_secret"], "payment_method": "pm_card_visa"},
            headers={"authorization": "Bearer pk_test_farebox_fake"},
        )
        assert confirmed.json()["status"] == "succeeded"
        served = httpx.get(api + "/report", headers={"x-receipt": invoice["client_secret"]})
        assert served.status_code == 200
        assert "peac-receipt" in served.headers
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=10)


def test_get_prints_the_paid_body_when_the_receipt_cannot_be_checked(chain: DevChain) -> None:
    """Paid, and the record names an https issuer this plain-http origin cannot vouch for: the
    body and the transaction are still the caller's, with the receipt problem beside them."""
    paid = make_gate(chain)  # signs as https://api.test; served here over plain http
    key = "0x" + os.urandom(32).hex()
    payer = EvmAccount.from_hex(key).address
    send_usdc(chain, payer, 100_000)
    with serve(fastapi_app(paid)) as base:
        lenient = farebox_get(base + "/weather", key=key)
        strict = farebox_get(base + "/weather", "--require-receipt", key=key)
    for run, code in ((lenient, 0), (strict, 3)):
        assert run.returncode == code, run.stderr
        assert json.loads(run.stdout) == {"forecast": "sunny"}
        summary, _ = json.JSONDecoder().raw_decode(run.stderr[run.stderr.index("{") :])
        assert summary["transaction"].startswith("0x")
        assert summary["receipt_verified"] is False
        assert summary["receipt_error"].startswith("E_KEY_NOT_FOUND")
        assert "warning: paid (transaction 0x" in run.stderr
    assert chain.balance_of(payer) == 100_000 - 2 * PRICE
