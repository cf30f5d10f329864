"""``/verify`` and ``/settle`` refuse an asset that is not an EIP-3009 token, before any gas.

An address without code answers every ``eth_call`` with an empty success, so a simulation of
``transferWithAuthorization`` "passes" there; a contract without EIP-3009 may do the same (a
fallback that accepts anything). The service checks the asset first, with the official
facilitators' codes, and remembers only the assets that passed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from x402.mechanisms.evm.constants import (
    ERR_ASSET_NOT_DEPLOYED_CONTRACT,
    ERR_EIP3009_NOT_SUPPORTED,
    ERR_FAILED_TO_GET_ASSET_INFO,
)

from farebox.dev.devchain import DevChain
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.facilitator.service import FacilitatorApp, facilitator_app
from farebox.ledgers.evm import EvmLedger
from farebox.ledgers.evm_asset import TokenCheck
from farebox.ledgers.rpc import Rpc, RpcError, RpcUnavailable
from farebox.protocol.models import Offer, Resource
from farebox.protocol.x402 import proof_to_json, requirements_to_json
from farebox.schemes.evm_exact import make_proof
from farebox.store.memory import MemoryStore

pytestmark = pytest.mark.anyio

SETTLER = 4
RESOURCE = Resource("https://api.test/weather", "weather", "application/json")
# Runtime code that stops at once (every call "succeeds" with no output), and one that reverts.
STOPS = "00"
REVERTS = "60006000fd"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Counting:
    """Counts the methods asked of the node; ``down`` makes it unreachable."""

    def __init__(self, inner: Rpc) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.down = False

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        self.calls.append(method)
        if self.down:
            raise RpcUnavailable(f"{method}: ConnectError talking to the node")
        return await self.inner.request(method, params)


def deploy(chain: DevChain, runtime: str) -> str:
    """A contract whose runtime code is ``runtime`` (hex); its address."""
    size = len(runtime) // 2
    # CODECOPY the runtime that follows this 12-byte prefix, then RETURN it.
    init = f"60{size:02x}600c60003960{size:02x}6000f3" + runtime
    sender = chain.accounts[0].address
    tx = chain.handle(
        "eth_sendTransaction", [{"from": sender, "data": "0x" + init, "gas": "0x30000"}]
    )
    address: str = chain.handle("eth_getTransactionReceipt", [tx])["contractAddress"]
    assert chain.handle("eth_getCode", [address, "latest"]) == "0x" + runtime
    return address


def app_on(chain: DevChain, rpc: Rpc) -> tuple[FacilitatorApp, MemoryStore]:
    ledger = EvmLedger(rpc, chain.accounts[SETTLER].account, network=chain.network)
    store = MemoryStore()
    return facilitator_app(LocalFacilitator([ledger]), store), store


def body_for(chain: DevChain, asset: str) -> dict[str, Any]:
    """A well-signed payment of 0.01 in ``asset`` (claiming the devchain token's domain)."""
    payer = EvmAccount.generate()
    token = chain.asset
    offer = Offer(
        "exact",
        chain.network,
        10_000,
        asset,
        EvmAccount.generate().address,
        300,
        {"name": token.name, "version": token.version},
    )
    proof = make_proof(payer, offer, now=int(time.time()), nonce=os.urandom(32), resource=RESOURCE)
    return {
        "x402Version": 2,
        "paymentPayload": proof_to_json(proof),
        "paymentRequirements": requirements_to_json(offer, RESOURCE, x402_version=2),
    }


def client_for(app: FacilitatorApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f.test")


def sent_by_settler(chain: DevChain) -> int:
    return int(chain.handle("eth_getTransactionCount", [chain.accounts[SETTLER].address]), 16)


def test_the_codes_are_the_official_ones() -> None:
    assert ERR_ASSET_NOT_DEPLOYED_CONTRACT == "asset_not_deployed_contract"
    assert ERR_EIP3009_NOT_SUPPORTED == "invalid_exact_evm_eip3009_not_supported"
    assert ERR_FAILED_TO_GET_ASSET_INFO == "invalid_exact_evm_failed_to_get_asset_info"


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("no code", ERR_ASSET_NOT_DEPLOYED_CONTRACT),
        ("stops", ERR_EIP3009_NOT_SUPPORTED),
        ("reverts", ERR_EIP3009_NOT_SUPPORTED),
    ],
)
async def test_an_asset_that_is_not_a_token_is_refused_before_any_gas(
    chain: DevChain, kind: str, code: str
) -> None:
    asset = {
        "no code": lambda: EvmAccount.generate().address,
        "stops": lambda: deploy(chain, STOPS),
        "reverts": lambda: deploy(chain, REVERTS),
    }[kind]()
    app, store = app_on(chain, chain.rpc)
    request = body_for(chain, asset)
    sent_before = sent_by_settler(chain)
    async with client_for(app) as client:
        verdict = (await client.post("/verify", json=request)).json()
        settled = (await client.post("/settle", json=request)).json()
    assert verdict["isValid"] is False
    assert verdict["invalidReason"] == code
    assert verdict["payer"] == request["paymentPayload"]["payload"]["authorization"]["from"]
    assert settled["success"] is False
    assert settled["errorReason"] == code
    assert settled["transaction"] == ""
    assert sent_by_settler(chain) == sent_before  # no transaction, no gas
    assert await store.events() == []
    # Nothing stays claimed: once a token is there, the same authorization could settle.
    assert await store.unfinished(held_before=2**62) == []


async def test_a_token_is_checked_once_and_a_refusal_is_asked_again(chain: DevChain) -> None:
    rpc = Counting(chain.rpc)
    app, _ = app_on(chain, rpc)
    empty = EvmAccount.generate().address
    async with client_for(app) as client:
        for _ in range(3):
            assert (await client.post("/verify", json=body_for(chain, chain.token))).json()[
                "invalidReason"
            ] == "invalid_exact_evm_insufficient_balance"  # the token passed; the payer is broke
        for _ in range(2):
            refused = (await client.post("/verify", json=body_for(chain, empty))).json()
            assert refused["invalidReason"] == ERR_ASSET_NOT_DEPLOYED_CONTRACT
    # One look at the token for three payments; the empty address is looked at each time (it may
    # be a token being deployed, and remembering refusals would let anyone fill the memory).
    assert rpc.calls.count("eth_getCode") == 1 + 2


async def test_an_unreachable_node_is_ledger_unavailable_and_not_remembered(
    chain: DevChain,
) -> None:
    rpc = Counting(chain.rpc)
    app, _ = app_on(chain, rpc)
    request = body_for(chain, chain.token)
    async with client_for(app) as client:
        rpc.down = True
        down = (await client.post("/verify", json=request)).json()
        rpc.down = False
        up = (await client.post("/verify", json=request)).json()
    assert down["invalidReason"] == "ledger_unavailable"
    assert up["invalidReason"] == "invalid_exact_evm_insufficient_balance"
    assert rpc.calls.count("eth_getCode") == 2


class Answers:
    """A node that answers eth_getCode and eth_call with fixed results (or errors)."""

    def __init__(self, code: Any, state: Any) -> None:
        self.answers = {"eth_getCode": code, "eth_call": state}

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        answer = self.answers[method]
        if isinstance(answer, Exception):
            raise answer
        return answer


WORD = "0x" + "00" * 32


@pytest.mark.parametrize(
    ("code", "state", "expected"),
    [
        (None, WORD, ERR_FAILED_TO_GET_ASSET_INFO),
        ("0xzz", WORD, ERR_FAILED_TO_GET_ASSET_INFO),
        (RpcError(-32000, "boom"), WORD, ERR_FAILED_TO_GET_ASSET_INFO),
        ("0x", WORD, ERR_ASSET_NOT_DEPLOYED_CONTRACT),
        ("0x00", "0x", ERR_EIP3009_NOT_SUPPORTED),
        ("0x00", "0x" + "00" * 31, ERR_EIP3009_NOT_SUPPORTED),
        ("0x00", "0x" + "00" * 31 + "02", ERR_EIP3009_NOT_SUPPORTED),
        ("0x00", RpcError(3, "execution reverted"), ERR_EIP3009_NOT_SUPPORTED),
        ("0x00", WORD, None),
        ("0x00", "0x" + "00" * 31 + "01", None),
    ],
)
async def test_token_check_reads_the_answers_strictly(
    code: Any, state: Any, expected: str | None
) -> None:
    check = TokenCheck()
    asset = EvmAccount.generate().address
    if expected is None:
        await check.check(Answers(code, state), asset)
        return
    with pytest.raises(PaymentError) as refused:
        await check.check(Answers(code, state), asset)
    assert refused.value.code == expected


async def test_a_passed_asset_is_checked_again_after_the_ttl(chain: DevChain) -> None:
    now = [1000.0]
    check = TokenCheck(ttl=60, clock=lambda: now[0])
    rpc = Counting(chain.rpc)
    for at in (1000.0, 1059.0, 1060.0, 1061.0):
        now[0] = at
        await check.check(rpc, chain.token)
    assert rpc.calls.count("eth_getCode") == 2  # at 1000 and when the 60 s ran out at 1060
