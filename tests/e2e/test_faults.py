"""Faults between the money moving and the answer arriving: the server dying, the client hanging
up. Through each, money moves at most once and a retry learns what happened."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from farebox.dev.devchain import DevChain
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.protocol.challenge import read_challenge
from farebox.protocol.x402 import decode_settlement, encode_proof
from farebox.receipts import SigningKey
from farebox.schemes.evm_exact import make_proof
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.routes import RouteTable
from farebox.store.sqlite import SqliteStore
from tests.support.asgi import call, chunked_app
from tests.support.chain import fund
from tests.support.faults import SlowBroadcast
from tests.support.gates import PRICE

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Died(Exception):
    """Stands for the process dying: nothing after this point runs."""


def server(chain: DevChain, path: Path, merchant: str, rpc: Any = None) -> PaymentMiddleware:
    """A server process's gate: its own ledger and store connection on the shared SQLite file."""
    routes = RouteTable()
    routes.add("GET", "/weather", PRICE, assets=chain.asset, pay_to=merchant)
    ledger = EvmLedger(rpc or chain.rpc, chain.accounts[1].account, network=chain.network)
    gate = Gate(
        routes, LocalFacilitator([ledger]), SqliteStore(path), signing_key=SigningKey.generate()
    )
    return PaymentMiddleware(chunked_app, gate)


async def signed(app: PaymentMiddleware, payer: Any) -> tuple[bytes, bytes]:
    [start, body] = await call(app, "/weather")
    challenge = read_challenge({k.decode(): v.decode() for k, v in start["headers"]}, body["body"])
    proof = make_proof(
        payer,
        challenge.accepts[0],
        now=int(time.time()),
        nonce=os.urandom(32),
        resource=challenge.resource,
    )
    return (b"payment-signature", encode_proof(proof).encode())


async def test_killed_after_settling_then_restarted(chain: DevChain, tmp_path: Path) -> None:
    merchant = "0x" + os.urandom(20).hex()
    first = server(chain, tmp_path / "payments.sqlite", merchant)
    payer = fund(chain)
    header = await signed(first, payer)

    async def dies_on_answer(message: Any) -> None:
        raise Died  # the process is killed as the settled response starts out

    scope_call = first(
        {
            "type": "http",
            "method": "GET",
            "scheme": "https",
            "path": "/weather",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"api.test"), header],
            "server": ("api.test", 443),
        },
        _receive,
        dies_on_answer,
    )
    with pytest.raises(Died):
        await scope_call
    assert chain.balance_of(merchant) == PRICE  # the money moved; the client got nothing
    # A new process on the same store: the client's retry is refused, naming the transaction.
    restarted = server(chain, tmp_path / "payments.sqlite", merchant)
    sent = await call(restarted, "/weather", [header])
    refusal = b"".join(m.get("body", b"") for m in sent)
    assert sent[0]["status"] == 402
    assert b"proof_replayed" in refusal
    [settled] = await restarted.gate.store.events(kind="settlement")
    assert settled.reference is not None
    assert settled.reference.encode() in refusal
    assert chain.balance_of(merchant) == PRICE  # one transfer, never a second


@pytest.mark.parametrize("with_id", [False, True])
async def test_client_hangs_up_while_settling(
    chain: DevChain, tmp_path: Path, with_id: bool
) -> None:
    merchant = "0x" + os.urandom(20).hex()
    app = server(chain, tmp_path / "payments.sqlite", merchant, SlowBroadcast(chain, 0.3))
    payer = fund(chain)
    header = await signed(app, payer)
    headers = [header]
    if with_id:
        headers.append((b"idempotency-key", b"hangup_" + os.urandom(12).hex().encode()))
    with anyio.move_on_after(0.1):  # the client is gone before the broadcast is accepted
        await call(app, "/weather", headers)
    await anyio.sleep(0.6)  # the shielded settlement finishes on its own
    assert chain.balance_of(merchant) == PRICE
    resent = await call(app, "/weather", headers)
    body = b"".join(m.get("body", b"") for m in resent)
    if with_id:
        # The resend with the same id gets the settled response itself, charged once.
        assert resent[0]["status"] == 200
        replay_headers = {k.decode().lower(): v.decode() for k, v in resent[0]["headers"]}
        assert decode_settlement(replay_headers["payment-response"]).success
        assert body == b"part 0part 1part 2"
    else:
        assert resent[0]["status"] == 402
        assert b"proof_replayed" in body
    assert chain.balance_of(merchant) == PRICE


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_slow_ledger_pending_then_reconciled_then_answered(
    chain: DevChain, tmp_path: Path
) -> None:
    from farebox.ops.reconcile import Reconciler
    from tests.support.faults import HiddenReceipts

    merchant = "0x" + os.urandom(20).hex()
    app = server(chain, tmp_path / "payments.sqlite", merchant, HiddenReceipts(chain))
    ledger = app.gate.facilitator.ledger_for(chain.network)  # type: ignore[attr-defined]
    ledger.confirm_timeout = 0.2
    payer = fund(chain)
    header = await signed(app, payer)
    sent = await call(app, "/weather", [header])
    pending = decode_settlement(
        {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}["payment-response"]
    )
    assert sent[0]["status"] == 402
    assert pending.pending
    # The reconciler reads the real chain and finds the transfer landed.
    truthful = EvmLedger(chain.rpc, chain.accounts[1].account, network=chain.network)
    report = await Reconciler(app.gate.store, [truthful]).run_once()
    assert report.settled == 1
    again = await call(app, "/weather", [header])
    body = b"".join(m.get("body", b"") for m in again)
    assert again[0]["status"] == 402
    assert b"proof_replayed" in body
    assert pending.transaction.encode() in body
    assert chain.balance_of(merchant) == PRICE  # one transfer for one payment


async def test_a_paid_head_is_never_charged(chain: DevChain, tmp_path: Path) -> None:
    merchant = "0x" + os.urandom(20).hex()
    app = server(chain, tmp_path / "payments.sqlite", merchant)
    header = await signed(app, fund(chain))
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app(
        {
            "type": "http",
            "method": "HEAD",
            "scheme": "https",
            "path": "/weather",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"api.test"), header],
            "server": ("api.test", 443),
        },
        _receive,
        send,
    )
    assert sent[0]["status"] == 402
    assert b"".join(m.get("body", b"") for m in sent) == b""
    assert chain.balance_of(merchant) == 0
    # The proof was not claimed: it still pays for a GET.
    assert (await call(app, "/weather", [header]))[0]["status"] == 200
    assert chain.balance_of(merchant) == PRICE


def test_a_real_server_process_killed_mid_response(tmp_path: Path) -> None:
    """`farebox serve` as a paid proxy, SIGKILLed after settling while the body is on its way;
    restarted on the same SQLite store, it refuses the retried payment naming the transaction.
    One transfer, never two."""
    import http.server
    import signal
    import subprocess
    import threading

    import httpx

    from farebox.dev.anvil import DEV_KEYS
    from farebox.eth import EvmAccount
    from farebox.money import DEVCHAIN_USDC
    from tests.support.processes import FAREBOX, balance
    from tests.support.servers import free_port, wait_for

    class SlowBody(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", "5")
            self.end_headers()
            self.wfile.flush()
            if self.path.startswith("/slow"):
                time.sleep(3)  # the body is late: the server dies before sending it
            self.wfile.write(b"hello")

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowBody)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    node_port, api_port = free_port(), free_port()
    node, api = f"http://127.0.0.1:{node_port}", f"http://127.0.0.1:{api_port}"
    merchant = "0x" + os.urandom(20).hex()
    (tmp_path / "settler.key").write_text(DEV_KEYS[1])
    config = tmp_path / "api.toml"
    config.write_text(
        f"[server]\nstore = 'payments.sqlite'\nupstream = 'http://127.0.0.1:{upstream.server_port}'\n"
        f"[payment]\nnetwork = 'devchain'\npay_to = '{merchant}'\n"
        f"[settlement]\nrpc_url = '{node}'\nsettler_key = 'settler.key'\n"
        "[[routes]]\npath = '/slow'\nprice = '$0.01'\n"
    )
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    chain_process = subprocess.Popen([*FAREBOX, "devchain", "--port", str(node_port)], **quiet)  # type: ignore[call-overload]
    servers: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(node, {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})

        def start_server() -> None:
            servers.append(
                subprocess.Popen(
                    [*FAREBOX, "serve", str(config), "--port", str(api_port)],
                    **quiet,  # type: ignore[call-overload]
                )
            )
            wait_for(api + "/health")

        start_server()
        unpaid = httpx.get(api + "/slow")
        challenge = read_challenge(dict(unpaid.headers), unpaid.content)
        payer = EvmAccount.from_hex(DEV_KEYS[8])
        proof = make_proof(
            payer,
            challenge.accepts[0],
            now=int(time.time()),
            nonce=os.urandom(32),
            resource=challenge.resource,
        )
        header = {"payment-signature": encode_proof(proof)}
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", api + "/slow", headers=header) as response,
        ):
            assert response.status_code == 200  # settled: the headers carry the settlement
            transaction = decode_settlement(response.headers["payment-response"]).transaction
            servers[0].send_signal(signal.SIGKILL)  # dies before the body is delivered
            servers[0].wait(timeout=10)
            with pytest.raises(httpx.HTTPError):
                response.read()
        assert balance(node, DEVCHAIN_USDC.address, merchant) == PRICE
        start_server()  # the same store file: it remembers the payment
        retried = httpx.get(api + "/slow", headers=header)
        assert retried.status_code == 402
        assert retried.json()["code"] == "proof_replayed"
        assert transaction in retried.json()["detail"]
        assert balance(node, DEVCHAIN_USDC.address, merchant) == PRICE  # one transfer
    finally:
        for process in [*servers, chain_process]:
            process.terminate()
            process.wait(timeout=10)
        upstream.shutdown()
        upstream.server_close()
