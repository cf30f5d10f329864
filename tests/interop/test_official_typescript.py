"""The official TypeScript client (``@x402/fetch`` with ``@x402/evm``, a viem account) pays a farebox
server, under node, over a real socket; the money moves on the chain and the TypeScript decoder
reads farebox's ``PAYMENT-RESPONSE``."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from farebox.dev.devchain import DevChain
from farebox.dev.sample import AGENT, SampleApi, build_sample_api
from farebox.eth import EvmAccount
from farebox.money import BASE_SEPOLIA_USDC
from farebox.receipts import verify_receipt
from tests.support.anvil import AnvilChain
from tests.support.node import JS_DIR
from tests.support.servers import free_port, wait_for

pytestmark = pytest.mark.node

# Development account #5 of the "test test ... junk" mnemonic (a public test key).
PAYER_KEY = "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba"


@pytest.fixture(scope="module")
def served(chain: DevChain) -> Iterator[tuple[SampleApi, str]]:
    api = build_sample_api(chain)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/health")
        yield api, base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def pay_with_typescript(
    node: str, url: str, key: str, allowed_assets: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    request: dict[str, Any] = {"url": url, "private_key": key}
    if allowed_assets is not None:
        request["allowed_assets"] = allowed_assets
    done = subprocess.run(
        [node, str(JS_DIR / "x402_pay.mjs")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def devchain_token(chain: DevChain) -> list[dict[str, str]]:
    return [{"network": chain.network, "asset": chain.asset.address}]


def test_official_typescript_client_pays_a_farebox_server(
    node: str, served: tuple[SampleApi, str]
) -> None:
    api, base = served
    chain = api.chain
    payer = chain.accounts[5].address
    assert AGENT != 5  # the demo's agent is another account
    before = chain.balance_of(payer), chain.balance_of(api.merchant)
    # The client pays only its default tokens unless told otherwise: the devchain's is not one.
    result = pay_with_typescript(node, base + "/weather", PAYER_KEY, devchain_token(chain))
    assert "error" not in result, result
    assert result["status"] == 200
    assert json.loads(result["body"])["forecast"] == "sunny"
    settled = result["payment_response"]
    assert settled["success"] is True
    assert settled["payer"] == payer
    assert settled["network"] == chain.network
    assert chain.balance_of(payer) == before[0] - 10_000
    assert chain.balance_of(api.merchant) == before[1] + 10_000
    receipt = verify_receipt(result["peac_receipt"], None, now=chain.now())
    commerce = receipt.claims["extensions"]["org.peacprotocol/commerce"]
    assert commerce["reference"] == settled["transaction"]


def test_official_typescript_client_is_refused_without_funds(
    node: str, served: tuple[SampleApi, str]
) -> None:
    api, base = served
    broke = "0x" + "42" * 32
    result = pay_with_typescript(node, base + "/weather", broke, devchain_token(api.chain))
    # The client does not retry a refused payment: it hands back the server's 402 and its code.
    assert result.get("status") == 402, result
    assert json.loads(result["body"])["code"] == "invalid_exact_evm_insufficient_balance"


def test_official_typescript_client_pays_with_default_settings_on_anvil(
    node: str, anvil_chain: AnvilChain
) -> None:
    """On chain 84532 with the token at Base Sepolia's canonical USDC address, the official client
    pays with no configuration at all: its spend controls know the asset."""
    from eth_account import Account

    from tests.support.anvil_app import farebox_app
    from tests.support.servers import serve

    payer = Account.create()
    anvil_chain.fund(payer.address, 1_000_000)
    merchant = EvmAccount.generate().address
    app, _ = farebox_app(anvil_chain, merchant)
    with serve(app) as base:
        result = pay_with_typescript(node, base + "/weather", "0x" + bytes(payer.key).hex())
    assert "error" not in result, result
    assert result["status"] == 200
    assert result["payment_response"]["success"] is True
    assert result["payment_response"]["network"] == BASE_SEPOLIA_USDC.network
    assert anvil_chain.balance(payer.address) == 1_000_000 - 10_000
    assert anvil_chain.balance(merchant) == 10_000
