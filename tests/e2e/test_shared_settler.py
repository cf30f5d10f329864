"""One settler key, three server processes: `farebox serve` three times over JSON-RPC to one
`farebox devchain` process, each with its own nonce counter for the same account.

Ninety distinct payments fired at once (thirty per process) are all served and all land, none is
refused for a nonce another process took. A payer holding one payment's worth who fires twenty
at once is served once; the other nineteen are refused with the insufficient-balance code before
anything is broadcast, so the settler pays gas for one transaction and none reverts.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from farebox.dev.anvil import DEV_KEYS
from farebox.eth import EvmAccount
from farebox.money import DEVCHAIN_USDC as USDC
from farebox.protocol.challenge import read_challenge
from farebox.protocol.models import Offer, Resource
from farebox.protocol.x402 import encode_proof
from farebox.schemes.evm_exact import make_proof
from tests.support.processes import FAREBOX, balance, rpc
from tests.support.servers import free_port, wait_for

PROCESSES = 3
PRICE = 10_000  # $0.01
SETTLER = EvmAccount.from_hex(DEV_KEYS[1])
PAYER = EvmAccount.from_hex(DEV_KEYS[3])
FUNDER = EvmAccount.from_hex(DEV_KEYS[9])


@pytest.fixture(scope="module")
def servers(devchain_process: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Three `farebox serve` processes, one settler key, each with a store of its own."""
    folder = tmp_path_factory.mktemp("shared_settler")
    (folder / "settler.key").write_text(DEV_KEYS[1])
    merchant = "0x" + os.urandom(20).hex()
    processes: list[subprocess.Popen[bytes]] = []
    bases: list[str] = []
    try:
        for index in range(PROCESSES):
            config = folder / f"api{index}.toml"
            config.write_text(
                "[server]\nstore = 'memory'\n"
                f"[payment]\nnetwork = 'devchain'\npay_to = '{merchant}'\n"
                f"[settlement]\nrpc_url = '{devchain_process}'\n"
                "settler_key = 'settler.key'\n"
                "[[routes]]\npath = '/weather'\nprice = '$0.01'\n"
                'content = \'{"forecast": "hail"}\'\n'
            )
            port = free_port()
            processes.append(
                subprocess.Popen(
                    [*FAREBOX, "serve", str(config), "--port", str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            bases.append(f"http://127.0.0.1:{port}")
        for base in bases:
            wait_for(base + "/health", timeout=60)
        yield bases
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)


def offer_of(base: str) -> tuple[Offer, Resource | None]:
    unpaid = httpx.get(base + "/weather")
    challenge = read_challenge(dict(unpaid.headers), unpaid.content)
    return challenge.accepts[0], challenge.resource


def fire(requests: list[tuple[str, dict[str, str]]]) -> list[httpx.Response]:
    """Send every (url, headers) GET at once."""
    responses: list[httpx.Response] = []

    async def one(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> None:
        responses.append(await client.get(url, headers=headers))

    async def all_at_once() -> None:
        limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
        async with (
            httpx.AsyncClient(timeout=60, limits=limits) as client,
            anyio.create_task_group() as tg,
        ):
            for url, headers in requests:
                tg.start_soon(one, client, url, headers)

    anyio.run(all_at_once)
    return responses


def paid_requests(
    bases: list[str], payer: EvmAccount, per_process: int
) -> list[tuple[str, dict[str, str]]]:
    """``per_process`` distinct payments by ``payer`` for each server, interleaved."""
    offers = [offer_of(base) for base in bases]
    requests = []
    for _ in range(per_process):
        for base, (offer, resource) in zip(bases, offers, strict=True):
            proof = make_proof(
                payer, offer, now=int(time.time()), nonce=os.urandom(32), resource=resource
            )
            requests.append((base + "/weather", {"payment-signature": encode_proof(proof)}))
    return requests


def settler_nonce(node: str) -> int:
    return int(str(rpc(node, "eth_getTransactionCount", SETTLER.address, "latest")), 16)


def head(node: str) -> int:
    return int(str(rpc(node, "eth_blockNumber")), 16)


def batch(node: str, calls: list[tuple[str, list[object]]]) -> list[object]:
    """The results of JSON-RPC ``calls`` sent as one batch, in order."""
    body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
    answers = httpx.post(node, json=body, timeout=60).json()
    return [a["result"] for a in sorted(answers, key=lambda a: a["id"])]


def settler_receipts(node: str, after_block: int) -> list[dict[str, str]]:
    """The receipt of every transaction the settler sent in the blocks after ``after_block``."""
    numbers = range(after_block + 1, head(node) + 1)
    blocks = batch(node, [("eth_getBlockByNumber", [hex(n), True]) for n in numbers])
    hashes = [
        tx["hash"]
        for block in blocks
        for tx in block["transactions"]  # type: ignore[index]
        if tx["from"].lower() == SETTLER.address.lower()
    ]
    receipts = batch(node, [("eth_getTransactionReceipt", [h]) for h in hashes]) if hashes else []
    return receipts  # type: ignore[return-value]


def eth_balance(node: str, holder: str) -> int:
    return int(str(rpc(node, "eth_getBalance", holder, "latest")), 16)


def merchant_of(bases: list[str]) -> str:
    return offer_of(bases[0])[0].pay_to


def test_ninety_payments_on_one_settler_key_across_three_processes(
    devchain_process: str, servers: list[str]
) -> None:
    node = devchain_process
    merchant = merchant_of(servers)
    start_block, start_nonce = head(node), settler_nonce(node)
    before = balance(node, USDC.address, merchant)
    started = time.monotonic()
    responses = fire(paid_requests(servers, PAYER, 30))
    took = time.monotonic() - started
    refusals = [
        (r.json().get("code"), r.json().get("detail")) for r in responses if r.status_code != 200
    ]
    served = sum(r.status_code == 200 for r in responses)
    statuses = [r["status"] for r in settler_receipts(node, start_block)]
    print(
        f"\nshared settler: {served} served, {statuses.count('0x1')} transfers, "
        f"{statuses.count('0x0')} reverted, refused {refusals}, in {took:.1f} s"
    )
    assert refusals == []
    assert served == 90
    assert balance(node, USDC.address, merchant) - before == 90 * PRICE
    assert settler_nonce(node) - start_nonce == 90
    assert statuses == ["0x1"] * 90


def test_twenty_at_once_from_a_payer_holding_one_payment_revert_nothing(
    devchain_process: str, servers: list[str]
) -> None:
    node = devchain_process
    merchant = merchant_of(servers)
    payer = EvmAccount.generate()
    transfer = (
        "0xa9059cbb"  # transfer(address,uint256)
        + payer.address[2:].lower().rjust(64, "0")
        + PRICE.to_bytes(32, "big").hex()
    )
    rpc(node, "eth_sendTransaction", {"from": FUNDER.address, "to": USDC.address, "data": transfer})
    assert balance(node, USDC.address, payer.address) == PRICE
    start_block, start_nonce = head(node), settler_nonce(node)
    gas_money = eth_balance(node, SETTLER.address)
    before = balance(node, USDC.address, merchant)
    # Spread over the three processes: seven, seven and six.
    responses = fire(paid_requests(servers, payer, 7)[:20])
    codes = [r.json().get("code") for r in responses if r.status_code != 200]
    receipts = settler_receipts(node, start_block)
    statuses = [r["status"] for r in receipts]
    served = sum(r.status_code == 200 for r in responses)
    print(
        f"\nunderfunded payer: {served} served, {statuses.count('0x1')} transfers, "
        f"{statuses.count('0x0')} reverted, refused {sorted(set(codes))} x {len(codes)}"
    )
    assert statuses.count("0x0") == 0, statuses  # no gas spent on a transfer that reverts
    assert served == 1
    assert codes == ["invalid_exact_evm_insufficient_balance"] * 19
    assert statuses == ["0x1"]
    assert settler_nonce(node) - start_nonce == 1
    assert balance(node, USDC.address, merchant) - before == PRICE
    assert balance(node, USDC.address, payer.address) == 0
    # The settler's gas went on the one transfer and on nothing else.
    [receipt] = receipts
    cost = int(receipt["gasUsed"], 16) * int(receipt["effectiveGasPrice"], 16)
    assert gas_money - eth_balance(node, SETTLER.address) == cost
