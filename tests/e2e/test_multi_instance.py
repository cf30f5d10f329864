"""Many server processes, one store: `farebox serve --workers 3` sharing PostgreSQL, then Redis, in
front of a `farebox devchain` process. Fifty concurrent requests carrying one proof, spread over
the workers: exactly one is served and one transfer lands; the rest are refused as replays."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import psycopg
import pytest
import redis

from farebox.dev.anvil import DEV_KEYS
from farebox.eth import EvmAccount
from farebox.money import DEVCHAIN_USDC as USDC
from farebox.protocol.challenge import read_challenge
from farebox.protocol.x402 import encode_proof
from farebox.schemes.evm_exact import make_proof
from tests.support.processes import FAREBOX, balance
from tests.support.servers import free_port, wait_for

PG = "postgresql://127.0.0.1:5432/test"
REQUESTS = 50


@pytest.fixture(scope="module")
def node(devchain_process: str) -> str:
    """A `farebox devchain` process: the node every worker settles on."""
    return devchain_process


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema of the test database, migrated with `farebox db migrate`."""
    schema = f"farebox_multi_{secrets.token_hex(4)}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{PG}?options=-csearch_path%3D{schema}"
    try:
        done = subprocess.run(
            [*FAREBOX, "db", "migrate", "--dsn", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        yield url
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of its own (the other tests use key prefixes in database 0)."""
    url = "redis://127.0.0.1:6379/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def serve_workers(
    tmp_path: Path, node: str, store: str, merchant: str
) -> tuple[subprocess.Popen[bytes], str]:
    (tmp_path / "settler.key").write_text(DEV_KEYS[1])
    config = tmp_path / "api.toml"
    config.write_text(
        f"[server]\nstore = '{store}'\n"
        f"[payment]\nnetwork = 'devchain'\npay_to = '{merchant}'\n"
        f"[settlement]\nrpc_url = '{node}'\nsettler_key = 'settler.key'\n"
        "[[routes]]\npath = '/weather'\nprice = '$0.01'\ncontent = '{\"forecast\": \"hail\"}'\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [*FAREBOX, "serve", str(config), "--port", str(port), "--workers", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(base + "/health", timeout=60)
    return process, base


def fifty_with_one_proof(base: str, payer_index: int) -> tuple[list[int], list[str]]:
    payer = EvmAccount.from_hex(DEV_KEYS[payer_index])
    unpaid = httpx.get(base + "/weather")
    challenge = read_challenge(dict(unpaid.headers), unpaid.content)
    proof = make_proof(
        payer,
        challenge.accepts[0],
        now=int(time.time()),
        nonce=os.urandom(32),
        resource=challenge.resource,
    )
    header = {"payment-signature": encode_proof(proof)}
    statuses: list[int] = []
    codes: list[str] = []

    async def one(client: httpx.AsyncClient) -> None:
        response = await client.get(base + "/weather", headers=header)
        statuses.append(response.status_code)
        if response.status_code != 200:
            codes.append(response.json().get("code"))

    async def all_at_once() -> None:
        limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
        async with (
            httpx.AsyncClient(timeout=60, limits=limits) as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(REQUESTS):
                tg.start_soon(one, client)

    anyio.run(all_at_once)
    return statuses, codes


@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_one_proof_across_workers_is_served_once(
    backend: str, node: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = request.getfixturevalue(f"{backend}_url")
    merchant = "0x" + secrets.token_hex(20)
    process, base = serve_workers(tmp_path, node, store, merchant)
    try:
        # Each backend's test pays from its own development account: their nonces never meet.
        statuses, codes = fifty_with_one_proof(base, 4 if backend == "postgres" else 5)
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert statuses.count(200) == 1, statuses
    assert len(statuses) == REQUESTS
    assert set(codes) <= {"proof_replayed"}, codes
    assert len(codes) == REQUESTS - 1
    assert balance(node, USDC.address, merchant) == 10_000  # one transfer, not fifty


def fifty_fresh_proofs_one_id(base: str, payer_index: int) -> list[httpx.Response]:
    payer = EvmAccount.from_hex(DEV_KEYS[payer_index])
    unpaid = httpx.get(base + "/weather")
    challenge = read_challenge(dict(unpaid.headers), unpaid.content)
    key = "retry_" + secrets.token_hex(16)
    headers = [
        {
            "payment-signature": encode_proof(
                make_proof(
                    payer,
                    challenge.accepts[0],
                    now=int(time.time()),
                    nonce=os.urandom(32),
                    resource=challenge.resource,
                )
            ),
            "idempotency-key": key,
        }
        for _ in range(REQUESTS)
    ]
    responses: list[httpx.Response] = []

    async def one(client: httpx.AsyncClient, header: dict[str, str]) -> None:
        responses.append(await client.get(base + "/weather", headers=header))

    async def all_at_once() -> None:
        limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
        async with (
            httpx.AsyncClient(timeout=60, limits=limits) as client,
            anyio.create_task_group() as tg,
        ):
            for header in headers:
                tg.start_soon(one, client, header)

    anyio.run(all_at_once)
    return responses


@pytest.mark.parametrize("backend", ["postgres", "redis"])
def test_one_idempotency_key_with_fresh_payments_charges_once(
    backend: str, node: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = request.getfixturevalue(f"{backend}_url")
    merchant = "0x" + secrets.token_hex(20)
    process, base = serve_workers(tmp_path, node, store, merchant)
    try:
        responses = fifty_fresh_proofs_one_id(base, 6 if backend == "postgres" else 7)
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert [r.status_code for r in responses] == [200] * REQUESTS, [
        r.text for r in responses if r.status_code != 200
    ][:3]
    assert {r.content for r in responses} == {b'{"forecast": "hail"}'}  # identical responses
    receipts = {r.headers["peac-receipt"] for r in responses}
    assert len(receipts) == 1  # one payment, one record, replayed
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == REQUESTS - 1
    assert balance(node, USDC.address, merchant) == 10_000  # one charge for fifty requests
