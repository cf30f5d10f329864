"""Across processes and sockets: ``farebox devchain`` in its own process, a uvicorn server settling on
it over JSON-RPC, the agent paying through ``requests``; the receipt checked by ``@peac/crypto``."""

from __future__ import annotations

import os
import threading
import time

import uvicorn

from farebox.agent.agent import Agent
from farebox.agent.requests_adapter import PaymentSession
from farebox.dev.sample import weather_app
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.ledgers.rpc import HttpRpc
from farebox.money import DEVCHAIN_USDC
from farebox.protocol.x402 import decode_settlement
from farebox.receipts import SigningKey, public_key_from_did_key, verify_receipt
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.routes import RouteTable
from farebox.store.sqlite import SqliteStore
from tests.support.node import node_verify
from tests.support.processes import DEV_KEYS, balance, rpc
from tests.support.servers import free_port, wait_for


def test_agent_pays_a_uvicorn_server_settling_on_a_devchain_process(
    devchain_process: str, node: str, tmp_path: object
) -> None:
    url = devchain_process
    # Every devchain has its token at the same address: the agent knows it from the registry.
    asset = DEVCHAIN_USDC
    assert int(str(rpc(url, "eth_chainId")), 16) == asset.chain_id
    settler, merchant, payer = (EvmAccount.from_hex(k) for k in DEV_KEYS[1:4])
    routes = RouteTable()
    routes.add("GET", "/weather", "$0.01", assets=asset, pay_to=merchant.address)
    key = SigningKey.generate()
    store = SqliteStore(os.path.join(str(tmp_path), "payments.sqlite"))
    gate = Gate(
        routes,
        LocalFacilitator([EvmLedger(HttpRpc(url), settler, network=asset.network)]),
        store,
        signing_key=key,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            PaymentMiddleware(weather_app, gate), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(f"http://127.0.0.1:{port}/health")
        before = (
            balance(url, asset.address, payer.address),
            balance(url, asset.address, merchant.address),
        )
        with PaymentSession(Agent(payer)) as session:
            response = session.get(f"http://127.0.0.1:{port}/weather", timeout=30)
        assert response.status_code == 200
        assert response.json()["forecast"] == "sunny"
        settlement = decode_settlement(response.headers["payment-response"])
        assert settlement.success
        receipt = response.headers["peac-receipt"]
        payment = response.farebox_payment  # type: ignore[attr-defined]
        assert payment.receipt is not None
        assert payment.receipt.issuer == key.did_key
        after = (
            balance(url, asset.address, payer.address),
            balance(url, asset.address, merchant.address),
        )
        assert after == (before[0] - 10_000, before[1] + 10_000)
        tx = rpc(url, "eth_getTransactionReceipt", settlement.transaction)
        assert isinstance(tx, dict)
        assert tx["status"] == "0x1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    # The reference TypeScript verifier accepts the record the server issued.
    claims = verify_receipt(receipt, None, now=int(time.time())).claims
    [checked] = node_verify(node, [(receipt, public_key_from_did_key(key.did_key))])
    assert checked["signature_valid"] is True
    assert checked["parse"]["ok"] is True
    assert checked["payload"] == claims
