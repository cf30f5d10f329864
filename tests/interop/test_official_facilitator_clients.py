"""Stock x402 resource servers on ``farebox facilitator``: one payment, one response.

The official server middleware (Python ``x402``'s FastAPI ``PaymentMiddlewareASGI``, and
``@x402/express`` in a node process) verifies a payment, runs the handler, settles, and serves
the response only when the facilitator answers ``success``. Both run here in front of farebox's
facilitator service (uvicorn on 127.0.0.1, its claims in SQLite as the ``farebox facilitator``
command keeps them), settling on the embedded chain:

* one payment header fired 50 times at once is served exactly once, with one transfer on chain;
* a payer who signs two authorizations with one EIP-3009 nonce ($0.01 to A, $0.50 to B) is
  served A; B's route serves nothing and B receives nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.facilitator.service import facilitator_app
from farebox.ledgers.evm import TRANSFER_TOPIC, EvmLedger
from farebox.protocol.x402 import decode_challenge_header, encode_proof
from farebox.schemes.evm_exact import make_proof
from farebox.store.sqlite import SqliteStore
from tests.support.chain import fund
from tests.support.node import JS_DIR
from tests.support.servers import serve

pytestmark = pytest.mark.anyio

CONCURRENT = 50
SETTLER = 6  # the facilitator's gas account in this module


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def facilitator(chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """farebox's facilitator service, as ``farebox facilitator`` builds it; its URL."""
    ledger = EvmLedger(chain.rpc, chain.accounts[SETTLER].account, network=chain.network)
    store = SqliteStore(tmp_path_factory.mktemp("facilitator") / "facilitator.sqlite")
    app = facilitator_app(LocalFacilitator([ledger]), store, close_on_shutdown=True)
    with serve(app) as url:
        yield url


@dataclass(frozen=True)
class Route:
    """A paid route; with ``hold`` its handler answers only once ``GET /_release`` was asked."""

    path: str
    amount: int
    pay_to: str
    hold: bool = False


Server = Callable[[Sequence[Route]], AbstractContextManager[str]]


def fastapi_server(chain: DevChain, facilitator_url: str) -> Server:
    """Starts the official Python middleware in front of a FastAPI app."""
    from x402 import x402ResourceServer
    from x402.http import FacilitatorConfig, HTTPFacilitatorClient
    from x402.http.middleware.fastapi import PaymentMiddlewareASGI
    from x402.http.types import PaymentOption, RouteConfig
    from x402.mechanisms.evm.exact.register import register_exact_evm_server
    from x402.schemas import AssetAmount

    @contextmanager
    def start(routes: Sequence[Route]) -> Iterator[str]:
        client = HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url))

        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            yield
            await client.aclose()  # its connections live in uvicorn's loop

        api = FastAPI(lifespan=lifespan)
        runs: Counter[str] = Counter()
        released = asyncio.Event()

        @api.get("/_runs")
        async def count() -> dict[str, int]:
            return dict(runs)

        @api.get("/_release")
        async def release() -> dict[str, str]:
            released.set()
            return {}

        def handler(route: Route) -> Callable[[], Any]:
            async def paid() -> dict[str, Any]:
                runs[route.path] += 1
                run = runs[route.path]
                if route.hold:
                    await released.wait()
                return {"route": route.path, "run": run}

            return paid

        config = {}
        for route in routes:
            api.get(route.path)(handler(route))
            price = AssetAmount(
                amount=str(route.amount),
                asset=chain.asset.address,
                extra={"name": chain.asset.name, "version": chain.asset.version},
            )
            option = PaymentOption(
                scheme="exact",
                pay_to=route.pay_to,
                price=price,
                network=chain.network,
                max_timeout_seconds=300,
            )
            config[f"GET {route.path}"] = RouteConfig(accepts=option)
        server = register_exact_evm_server(x402ResourceServer(client), chain.network)
        api.add_middleware(PaymentMiddlewareASGI, routes=config, server=server)
        with serve(api) as base:
            yield base

    return start


def express_server(chain: DevChain, facilitator_url: str, node: str) -> Server:
    """Starts ``@x402/express`` (``js/x402_express_server.mjs``) under node."""

    @contextmanager
    def start(routes: Sequence[Route]) -> Iterator[str]:
        config = {
            "facilitator_url": facilitator_url,
            "network": chain.network,
            "routes": [
                {
                    "path": route.path,
                    "amount": str(route.amount),
                    "asset": chain.asset.address,
                    "pay_to": route.pay_to,
                    "name": chain.asset.name,
                    "version": chain.asset.version,
                    "hold": route.hold,
                }
                for route in routes
            ],
        }
        process = subprocess.Popen(
            [node, str(JS_DIR / "x402_express_server.mjs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(json.dumps(config) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()  # the process prints its port once listening
            if not line:
                assert process.stderr is not None
                raise AssertionError(process.stderr.read()[-2000:])
            yield f"http://127.0.0.1:{json.loads(line)['port']}"
        finally:
            process.stdin.close()  # its lifeline: the server exits
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()

    return start


@pytest.fixture(params=["fastapi", pytest.param("express", marks=pytest.mark.node)])
def official_server(
    request: pytest.FixtureRequest, chain: DevChain, facilitator: str
) -> tuple[str, Server]:
    if request.param == "fastapi":
        return "fastapi", fastapi_server(chain, facilitator)
    return "express", express_server(chain, facilitator, request.getfixturevalue("node"))


# --- helpers --------------------------------------------------------------------------------------


def transfers_from(chain: DevChain, payer: str) -> int:
    query = {
        "address": chain.token,
        "fromBlock": "earliest",
        "toBlock": "latest",
        "topics": [TRANSFER_TOPIC, "0x" + payer[2:].lower().rjust(64, "0")],
    }
    return len(chain.handle("eth_getLogs", [query]))


async def payment_for(
    client: httpx.AsyncClient, url: str, payer: EvmAccount, nonce: bytes
) -> dict[str, str]:
    """The ``PAYMENT-SIGNATURE`` header paying the server's own 402 for ``url``."""
    unpaid = await client.get(url)
    assert unpaid.status_code == 402, unpaid.text
    challenge = decode_challenge_header(unpaid.headers["payment-required"])
    [offer] = challenge.accepts
    proof = make_proof(payer, offer, now=int(time.time()), nonce=nonce, resource=challenge.resource)
    return {"PAYMENT-SIGNATURE": encode_proof(proof)}


# --- the tests ------------------------------------------------------------------------------------


async def test_one_payment_fired_fifty_times_is_served_once(
    chain: DevChain, official_server: tuple[str, Server]
) -> None:
    name, start = official_server
    payer = fund(chain)
    merchant = EvmAccount.generate().address
    with start([Route("/weather", 10_000, merchant)]) as base:
        async with httpx.AsyncClient(timeout=60) as client:
            headers = await payment_for(client, f"{base}/weather", payer, os.urandom(32))
            statuses: list[int] = []
            started = time.perf_counter()

            async def fire() -> None:
                statuses.append((await client.get(f"{base}/weather", headers=headers)).status_code)

            async with anyio.create_task_group() as group:
                for _ in range(CONCURRENT):
                    group.start_soon(fire)
            elapsed = time.perf_counter() - started
            runs = (await client.get(f"{base}/_runs")).json()
    counted = Counter(statuses)
    transfers = transfers_from(chain, payer.address)
    print(
        f"{name}: {CONCURRENT} concurrent requests with one payment: served {counted[200]}, "
        f"refused {counted[402]}, other {CONCURRENT - counted[200] - counted[402]}, "
        f"handler runs {runs.get('/weather', 0)}, transfers {transfers}, {elapsed:.2f} s"
    )
    assert counted[200] == 1, counted
    assert counted[402] == CONCURRENT - 1, counted
    assert transfers == 1
    assert chain.balance_of(merchant) == 10_000
    assert chain.balance_of(payer.address) == 1_000_000 - 10_000


async def test_two_authorizations_sharing_a_nonce_serve_only_the_first(
    chain: DevChain, official_server: tuple[str, Server]
) -> None:
    # The payer signs $0.50 to B and $0.01 to A with one nonce. B's request passes /verify (the
    # nonce is unused then) and its handler waits; A is paid and served meanwhile; then B's
    # handler returns and the middleware settles B: the facilitator must not call that paid.
    name, start = official_server
    payer = fund(chain)
    nonce = os.urandom(32)
    merchant_a, merchant_b = EvmAccount.generate().address, EvmAccount.generate().address
    routes = [Route("/a", 10_000, merchant_a), Route("/b", 500_000, merchant_b, hold=True)]
    with start(routes) as base:
        async with httpx.AsyncClient(timeout=60) as client:
            pay_a = await payment_for(client, f"{base}/a", payer, nonce)
            pay_b = await payment_for(client, f"{base}/b", payer, nonce)  # the same nonce
            answers: dict[str, httpx.Response] = {}

            async def request_b() -> None:
                answers["b"] = await client.get(f"{base}/b", headers=pay_b)

            async with anyio.create_task_group() as group:
                group.start_soon(request_b)
                with anyio.fail_after(20):
                    while (await client.get(f"{base}/_runs")).json().get("/b", 0) == 0:
                        await anyio.sleep(0.02)  # B verified; its handler is waiting
                answers["a"] = await client.get(f"{base}/a", headers=pay_a)
                await client.get(f"{base}/_release")
            # And B once more, now that the nonce is spent on chain.
            answers["b again"] = await client.get(f"{base}/b", headers=pay_b)
            runs = (await client.get(f"{base}/_runs")).json()
    transfers = transfers_from(chain, payer.address)
    print(
        f"{name}: A {answers['a'].status_code}, B {answers['b'].status_code} (verified while "
        f"unused, settled after A), B again {answers['b again'].status_code}, B's handler runs "
        f"{runs.get('/b', 0)}, B received {chain.balance_of(merchant_b)}, transfers {transfers}"
    )
    assert answers["a"].status_code == 200, answers["a"].text
    assert answers["a"].json() == {"route": "/a", "run": 1}
    for key in ("b", "b again"):
        assert answers[key].status_code == 402, answers[key].text
        assert b'"run"' not in answers[key].content  # nothing of B's response was served
    assert runs.get("/b", 0) == 1  # the verified one ran; the second was refused at /verify
    assert chain.balance_of(merchant_a) == 10_000
    assert chain.balance_of(merchant_b) == 0
    assert chain.balance_of(payer.address) == 1_000_000 - 10_000
    assert transfers == 1


@pytest.mark.node
def test_the_express_peer_is_pinned(node: str) -> None:
    """``@x402/express`` and ``express`` come from the committed lock file, like the others."""
    manifest = json.loads((JS_DIR / "package.json").read_text())["dependencies"]
    lock = json.loads((JS_DIR / "package-lock.json").read_text())["packages"]
    assert manifest["@x402/express"] == manifest["@x402/core"] == "2.27.0"
    for package in ("@x402/express", "express"):
        assert lock[f"node_modules/{package}"]["version"] == manifest[package]
        assert Path(JS_DIR / "node_modules" / package / "package.json").exists()
