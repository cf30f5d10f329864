"""The embedded chain: its accounts, its JSON-RPC answers (in-process and over HTTP), its clock."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from eth_abi.abi import encode
from eth_account import Account

from farebox.cli.devchain import devchain_banner
from farebox.dev.devchain import (
    CHAIN_ID,
    DEVCHAIN_NETWORK,
    DEVCHAIN_TOKEN,
    DevChain,
    DevChainRpc,
    revert_error,
)
from farebox.dev.rpc_server import MAX_BODY_BYTES, DevChainServer
from farebox.eth import EvmAccount, keccak256
from farebox.ledgers.rpc import HttpRpc, Rpc, RpcError

pytestmark = pytest.mark.anyio

QUANTITY = re.compile(r"0x(0|[1-9a-f][0-9a-f]*)\Z")
DATA = re.compile(r"0x([0-9a-f]{2})*\Z")
# The first three accounts of the "test test ... junk" mnemonic, as anvil and hardhat list them.
STANDARD_ACCOUNTS = (
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
)
# Account 0's well-known private key, to check it is never printed (it is public anyway).
ACCOUNT_0_KEY = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def chain() -> DevChain:
    # Not the session's chain: this module tests the chain itself. Its evm_revert rewinds the
    # head and drops every sender's queued transactions, its cheat codes rewrite balances, nonces
    # and storage, and it asserts exact answers (nonce gaps, block contents) that another test's
    # traffic on a shared chain could change.
    return DevChain()


@pytest.fixture(scope="module")
def server(chain: DevChain) -> Iterator[DevChainServer]:
    with DevChainServer(chain, port=0) as running:
        yield running


def transfer_data(to: str, amount: int) -> str:
    return (
        "0x"
        + (
            keccak256(b"transfer(address,uint256)")[:4]
            + encode(["address", "uint256"], [to, amount])
        ).hex()
    )


def balance_data(holder: str) -> str:
    return "0x70a08231" + encode(["address"], [holder]).hex()


def key_of(account: EvmAccount) -> bytes:
    # The test reaches for the (public) dev key only to sign with eth-account, another signer.
    secret: bytes = account._key.secret
    return secret


def signed_transfer(
    chain: DevChain, sender: EvmAccount, to: str, amount: int, **fields: Any
) -> str:
    tx: dict[str, Any] = {
        "to": chain.token,
        "data": transfer_data(to, amount),
        "gas": 100_000,
        "maxFeePerGas": 10**10,
        "maxPriorityFeePerGas": 10**9,
        "nonce": int(chain.handle("eth_getTransactionCount", [sender.address, "pending"]), 16),
        "chainId": CHAIN_ID,
        "value": 0,
    }
    tx.update(fields)
    tx = {name: value for name, value in tx.items() if value is not None}  # None drops a field
    return "0x" + Account.sign_transaction(tx, key_of(sender)).raw_transaction.hex()


# --- the chain ------------------------------------------------------------------------------------


def test_a_new_chain_has_the_standard_accounts_and_token() -> None:
    started = time.perf_counter()
    chain = DevChain()
    assert time.perf_counter() - started < 30  # a generous bound; it takes ~0.2 s
    assert chain.chain_id == CHAIN_ID == 131277322940537
    assert chain.network == DEVCHAIN_NETWORK == "eip155:131277322940537"
    assert chain.token == DEVCHAIN_TOKEN == chain.asset.address
    assert chain.asset.network == chain.network
    assert len(chain.accounts) == 10
    assert tuple(a.address for a in chain.accounts[:3]) == STANDARD_ACCOUNTS
    for account in chain.accounts:
        assert account.account.address == account.address
        assert chain.balance_of(account.address) == 1_000 * 10**6
    for account in chain.accounts[1:]:
        assert chain.eth_balance(account.address) == 10_000 * 10**18
    assert 9_999 * 10**18 < chain.eth_balance(chain.accounts[0].address) < 10_000 * 10**18
    assert chain.handle("eth_accounts", []) == [a.address.lower() for a in chain.accounts]
    # Nothing shows a key.
    shown = repr(chain.accounts) + str(chain.accounts[0]) + devchain_banner(chain, "http://x")
    assert ACCOUNT_0_KEY not in shown.lower()
    assert isinstance(chain.rpc, Rpc)


def test_basic_answers_are_hex_like_geths(chain: DevChain) -> None:
    assert chain.handle("eth_chainId", []) == hex(CHAIN_ID)
    assert chain.handle("net_version", []) == str(CHAIN_ID)
    assert chain.handle("web3_clientVersion", []).startswith("farebox-devchain/")
    for method in ("eth_blockNumber", "eth_gasPrice", "eth_maxPriorityFeePerGas"):
        assert QUANTITY.match(chain.handle(method, [])), method
    address = chain.accounts[2].address
    assert chain.handle("eth_getBalance", [address, "latest"]) == hex(chain.eth_balance(address))
    assert QUANTITY.match(chain.handle("eth_getTransactionCount", [address, "pending"]))
    assert DATA.match(chain.handle("eth_getCode", [chain.token, "latest"]))
    assert chain.handle("eth_getCode", [address, "latest"]) == "0x"
    slot = chain.handle("eth_getStorageAt", [chain.token, "0x0", "latest"])
    assert len(slot) == 66
    block = chain.handle("eth_getBlockByNumber", ["latest", False])
    for field in ("number", "gasLimit", "gasUsed", "timestamp", "baseFeePerGas", "size"):
        assert QUANTITY.match(block[field]), field
    for field in ("hash", "parentHash", "stateRoot", "transactionsRoot", "receiptsRoot"):
        assert DATA.match(block[field]), field
        assert len(block[field]) == 66, field
    assert chain.handle("eth_getBlockByHash", [block["hash"], False]) == block
    assert chain.handle("eth_getBlockByNumber", ["0xffffff", False]) is None
    assert chain.handle("eth_getBlockByHash", ["0x" + "11" * 32, False]) is None
    pending = chain.handle("eth_getBlockByNumber", ["pending", False])
    assert int(pending["number"], 16) == int(block["number"], 16) + 1
    assert pending["hash"] is None
    history = chain.handle("eth_feeHistory", ["0x4", "latest", [25, 75]])
    assert len(history["baseFeePerGas"]) == len(history["gasUsedRatio"]) + 1
    assert len(history["reward"]) == len(history["gasUsedRatio"])
    assert all(QUANTITY.match(fee) for fee in history["baseFeePerGas"])
    assert chain.handle("eth_getTransactionReceipt", ["0x" + "22" * 32]) is None
    assert chain.handle("eth_getTransactionByHash", ["0x" + "22" * 32]) is None


def test_transactions_receipts_and_logs(chain: DevChain) -> None:
    sender = chain.accounts[3].account
    receiver = EvmAccount.generate().address
    tx_hash = chain.handle("eth_sendRawTransaction", [signed_transfer(chain, sender, receiver, 42)])
    receipt = chain.handle("eth_getTransactionReceipt", [tx_hash])
    assert receipt["status"] == "0x1"
    assert receipt["transactionHash"] == tx_hash
    assert receipt["from"] == sender.address.lower()
    assert receipt["to"] == chain.token.lower()
    assert receipt["contractAddress"] is None
    assert receipt["type"] == "0x2"
    for field in ("blockNumber", "gasUsed", "cumulativeGasUsed", "effectiveGasPrice"):
        assert QUANTITY.match(receipt[field]), field
    assert len(receipt["logsBloom"]) == 2 + 512
    tx = chain.handle("eth_getTransactionByHash", [tx_hash])
    assert tx["hash"] == tx_hash
    assert tx["blockHash"] == receipt["blockHash"]
    assert tx["input"] == transfer_data(receiver, 42)
    assert tx["chainId"] == hex(CHAIN_ID)
    assert tx["yParity"] in ("0x0", "0x1")
    block = chain.handle("eth_getBlockByNumber", [receipt["blockNumber"], True])
    assert block["transactions"][0]["hash"] == tx_hash
    assert chain.handle("eth_getBlockReceipts", [receipt["blockNumber"]]) == [receipt]
    topic = "0x" + keccak256(b"Transfer(address,address,uint256)").hex()
    to_topic = "0x" + encode(["address"], [receiver]).hex()
    logs = chain.handle(
        "eth_getLogs",
        [{"fromBlock": "0x0", "address": chain.token, "topics": [topic, None, to_topic]}],
    )
    assert [log["transactionHash"] for log in logs] == [tx_hash]
    assert logs == receipt["logs"]
    by_hash = chain.handle(
        "eth_getLogs", [{"blockHash": receipt["blockHash"], "topics": [[topic]]}]
    )
    assert by_hash == receipt["logs"]
    assert chain.handle("eth_getLogs", [{"fromBlock": "0x0", "address": "0x" + "33" * 20}]) == []


def test_legacy_transactions_and_nonces(chain: DevChain) -> None:
    sender = chain.accounts[5].account
    receiver = EvmAccount.generate().address
    legacy = signed_transfer(
        chain, sender, receiver, 1, gasPrice=10**10, maxFeePerGas=None, maxPriorityFeePerGas=None
    )
    legacy_hash = chain.handle("eth_sendRawTransaction", [legacy])
    assert chain.handle("eth_getTransactionByHash", [legacy_hash])["type"] == "0x0"
    assert chain.handle("eth_getTransactionReceipt", [legacy_hash])["status"] == "0x1"
    with pytest.raises(RpcError) as low:
        chain.handle("eth_sendRawTransaction", [legacy])
    assert low.value.code == -32000
    assert low.value.message.startswith("nonce too low")
    # A nonce ahead is kept until the gap fills, as a node's pool keeps it.
    nonce = int(chain.handle("eth_getTransactionCount", [sender.address, "latest"]), 16)
    later = chain.handle(
        "eth_sendRawTransaction", [signed_transfer(chain, sender, receiver, 2, nonce=nonce + 1)]
    )
    assert chain.handle("eth_getTransactionReceipt", [later]) is None
    assert chain.handle("eth_getTransactionByHash", [later])["blockNumber"] is None
    first = chain.handle(
        "eth_sendRawTransaction", [signed_transfer(chain, sender, receiver, 3, nonce=nonce)]
    )
    assert chain.handle("eth_getTransactionReceipt", [first])["status"] == "0x1"
    assert chain.handle("eth_getTransactionReceipt", [later])["status"] == "0x1"
    assert chain.balance_of(receiver) == 6


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"chainId": 1}, "invalid chain id for signer"),
        ({"gas": 20_000}, "intrinsic gas too low"),
        (
            {"maxFeePerGas": 1, "maxPriorityFeePerGas": 1},
            "max fee per gas less than block base fee",
        ),
        ({"maxFeePerGas": 10**30}, "insufficient funds for gas * price + value"),
    ],
)
def test_invalid_transactions_are_refused_with_geths_words(
    chain: DevChain, fields: dict[str, Any], message: str
) -> None:
    raw = signed_transfer(chain, chain.accounts[6].account, chain.accounts[7].address, 1, **fields)
    with pytest.raises(RpcError) as caught:
        chain.handle("eth_sendRawTransaction", [raw])
    assert caught.value.code == -32000
    assert caught.value.message.startswith(message)


def test_estimate_gas_suffices_and_is_tight(chain: DevChain) -> None:
    sender = chain.accounts[8].address
    call = {
        "from": sender,
        "to": chain.token,
        "data": transfer_data(EvmAccount.generate().address, 5),
    }
    estimate = int(chain.handle("eth_estimateGas", [call]), 16)
    tx_hash = chain.handle("eth_sendTransaction", [{**call, "gas": hex(estimate)}])
    receipt = chain.handle("eth_getTransactionReceipt", [tx_hash])
    assert receipt["status"] == "0x1"
    assert int(receipt["gasUsed"], 16) <= estimate <= int(receipt["gasUsed"], 16) * 1.1 + 2300


def test_unknown_methods_and_bad_params_are_json_rpc_errors(chain: DevChain) -> None:
    with pytest.raises(RpcError) as unknown:
        chain.handle("eth_mineGold", [])
    assert unknown.value.code == -32601
    for method, params in [
        ("eth_getBalance", []),
        ("eth_getBalance", ["0x1234"]),
        ("eth_getBalance", [chain.token, "yesterday"]),
        ("eth_call", ["not an object"]),
        ("eth_call", [{"to": chain.token, "data": "0xzz"}]),
        ("eth_call", [{"to": chain.token, "data": "0x1", "input": "0x2"}]),
        ("eth_sendRawTransaction", ["0x"]),
        ("eth_sendRawTransaction", ["0xdeadbeef"]),
        ("eth_getBlockByNumber", [{"nonsense": True}]),
        ("eth_getLogs", [{"fromBlock": "0x5", "toBlock": "0x1"}]),
        ("eth_getLogs", [{"topics": "0x12"}]),
        ("eth_feeHistory", ["0x2", "latest", [90, 10]]),
        ("evm_revert", ["-1"]),
    ]:
        with pytest.raises(RpcError) as caught:
            chain.handle(method, params)
        assert caught.value.code == -32602, (method, params, caught.value)


GARBAGE: list[Any] = [
    None,
    True,
    -1,
    2**70,
    1.5,
    "",
    "0x",
    "0xzz",
    "latest",
    "0x" + "ff" * 40,
    {},
    [],
    {"to": 5},
]
METHODS = [
    "eth_getBalance", "eth_getTransactionCount", "eth_getCode", "eth_getStorageAt", "eth_call",
    "eth_estimateGas", "eth_sendRawTransaction", "eth_sendTransaction", "eth_getTransactionByHash",
    "eth_getTransactionReceipt", "eth_getBlockByNumber", "eth_getBlockByHash", "eth_getBlockReceipts",
    "eth_getLogs", "eth_feeHistory", "evm_mine", "evm_revert", "evm_increaseTime",
    "evm_setNextBlockTimestamp", "anvil_setCode", "anvil_setBalance", "anvil_setNonce",
    "anvil_setStorageAt", "anvil_mine", "eth_getTransactionByBlockNumberAndIndex", "web3_sha3",
]  # fmt: skip


def test_garbage_never_escapes_as_another_exception() -> None:
    chain = DevChain()  # its own: some of these calls move its clock or mine
    codes: set[int] = set()
    for method in METHODS:
        for first in GARBAGE:
            for params in ([first], [first, first], [first, first, first]):
                try:
                    chain.handle(method, params)
                except RpcError as exc:  # anything else fails the test
                    codes.add(exc.code)
    assert codes <= {-32602, -32000, 3}
    with pytest.raises(RpcError):
        chain.handle("eth_chainId", "not a list")  # type: ignore[arg-type]


def test_snapshots_and_cheat_codes(chain: DevChain) -> None:
    holder = chain.accounts[9].address
    stranger = "0x" + "44" * 20
    snapshot = chain.handle("evm_snapshot", [])
    height = chain.handle("eth_blockNumber", [])
    before = chain.balance_of(holder)
    tx_hash = chain.handle(
        "eth_sendTransaction",
        [{"from": holder, "to": chain.token, "data": transfer_data(stranger, 7)}],
    )
    assert chain.handle("anvil_setBalance", [stranger, hex(10**18)]) is None
    assert chain.handle("hardhat_setNonce", [stranger, "0x5"]) is None
    assert chain.handle("anvil_setStorageAt", [stranger, "0x1", "0x" + "ab" * 32]) is True
    assert chain.eth_balance(stranger) == 10**18
    assert chain.handle("eth_getTransactionCount", [stranger, "latest"]) == "0x5"
    assert chain.handle("eth_getStorageAt", [stranger, "0x1", "latest"]) == "0x" + "ab" * 32
    assert chain.balance_of(stranger) == 7
    assert chain.handle("evm_revert", [snapshot]) is True
    assert chain.handle("eth_blockNumber", []) == height
    assert chain.balance_of(holder) == before
    assert chain.balance_of(stranger) == 0
    assert chain.eth_balance(stranger) == 0
    assert chain.handle("eth_getTransactionReceipt", [tx_hash]) is None
    assert chain.handle("evm_revert", [snapshot]) is False  # spent
    # The chain goes on from there.
    again = chain.handle(
        "eth_sendTransaction",
        [{"from": holder, "to": chain.token, "data": transfer_data(stranger, 8)}],
    )
    assert chain.handle("eth_getTransactionReceipt", [again])["status"] == "0x1"
    assert chain.balance_of(stranger) == 8


def test_many_threads_share_one_chain(chain: DevChain) -> None:
    receivers = [EvmAccount.generate().address for _ in range(6)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            sender = chain.accounts[1 + index % 3].address  # three senders, two threads each
            for _ in range(3):
                call = {
                    "from": sender,
                    "to": chain.token,
                    "data": transfer_data(receivers[index], 1),
                }
                tx_hash = chain.handle("eth_sendTransaction", [call])
                assert chain.handle("eth_getTransactionReceipt", [tx_hash])["status"] == "0x1"
                chain.handle("eth_getBlockByNumber", ["latest", True])
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [chain.balance_of(r) for r in receivers] == [3] * 6


async def test_the_in_process_rpc(chain: DevChain) -> None:
    rpc = chain.rpc
    assert isinstance(rpc, DevChainRpc)
    assert await rpc.request("eth_chainId") == hex(CHAIN_ID)
    result = await rpc.request(
        "eth_call", [{"to": chain.token, "data": balance_data(chain.accounts[0].address)}]
    )
    assert int(result, 16) == chain.balance_of(chain.accounts[0].address)
    with pytest.raises(RpcError) as caught:
        await rpc.request(
            "eth_call",
            [
                {
                    "from": chain.accounts[2].address,
                    "to": chain.token,
                    "data": transfer_data(chain.accounts[3].address, 10**18),
                }
            ],
        )
    assert caught.value.code == 3
    assert caught.value.message == "execution reverted: ERC20: transfer amount exceeds balance"


def test_revert_error_shapes() -> None:
    assert (revert_error(b"").code, revert_error(b"").message) == (-32000, "execution reverted")
    custom = revert_error(bytes.fromhex("deadbeef"))
    assert (custom.code, custom.message, custom.data) == (3, "execution reverted", "0xdeadbeef")
    panic = revert_error(bytes.fromhex("4e487b71") + (0x11).to_bytes(32, "big"))
    assert panic.message == "execution reverted: arithmetic underflow or overflow"


# --- the clock ------------------------------------------------------------------------------------


def test_block_time_follows_the_wall_clock_however_fast_blocks_come() -> None:
    chain = DevChain()  # its own: the clock is moved at the end
    sender = chain.accounts[1].address
    last = 0
    for i in range(400):  # far more blocks than seconds
        if i % 50:
            chain.handle("evm_mine", [])
        else:
            call = {"from": sender, "to": chain.token, "data": transfer_data(sender, 1)}
            chain.handle("eth_sendTransaction", [{**call, "gas": "0x186a0"}])
        stamp = int(chain.handle("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)
        assert stamp >= last  # never backwards
        last = stamp
        # floor(now) <= block time <= floor(now) + 1, and the clock may tick in between.
        assert int(time.time()) - 1 <= stamp <= int(time.time()) + 1
    assert int(time.time()) - 1 <= chain.now() <= int(time.time()) + 1
    # evm_increaseTime and evm_setNextBlockTimestamp move the clock as on anvil.
    assert chain.handle("evm_increaseTime", [3600]) == 3600
    assert chain.now() >= int(time.time()) + 3599
    target = chain.now() + 50
    assert chain.handle("evm_setNextBlockTimestamp", [hex(target)]) is None
    chain.handle("evm_mine", [])
    assert chain.handle("eth_getBlockByNumber", ["latest", False])["timestamp"] == hex(target)
    with pytest.raises(RpcError):
        chain.handle("evm_setNextBlockTimestamp", [hex(target - 10)])


def test_authorizations_signed_by_the_wall_clock_settle_after_a_burst_of_blocks() -> None:
    """Signed for [now - 600, now + 300] by the wall clock, after more blocks than seconds.

    With py-evm's own dating (parent + 1 per block), 400 quick blocks would put the chain
    400 s ahead and every such authorization would be "expired".
    """
    from farebox.eth import address_bytes
    from farebox.schemes.evm_exact import Authorization, authorization_digest, domain_separator

    chain = DevChain()  # its own: the burst of blocks must be the only traffic on its clock
    chain.handle("anvil_mine", [hex(400)])
    payer = chain.accounts[1].account
    payee = chain.accounts[2].address
    separator = domain_separator("USD Coin", "2", chain.chain_id, chain.token)
    types = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"]  # fmt: skip
    function = keccak256(
        b"transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
    )[:4]
    for _ in range(25):
        now = int(time.time())
        auth = Authorization(
            address_bytes(payer.address),
            address_bytes(payee),
            1,
            now - 600,
            now + 300,
            os.urandom(32),
        )
        sig = payer.sign_digest(authorization_digest(auth, separator))
        data = function + encode(
            types,
            [auth.from_, auth.to, 1, auth.valid_after, auth.valid_before, auth.nonce, sig[64], sig[:32], sig[32:64]],
        )  # fmt: skip
        call = {"from": chain.accounts[3].address, "to": chain.token, "data": "0x" + data.hex()}
        tx_hash = chain.handle("eth_sendTransaction", [{**call, "gas": "0x30000"}])
        assert chain.handle("eth_getTransactionReceipt", [tx_hash])["status"] == "0x1"
    assert chain.now() <= int(time.time()) + 1


# --- over HTTP ------------------------------------------------------------------------------------


def post(server: DevChainServer, body: bytes | Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(
        server.url, content=content, headers={"content-type": "application/json"}, timeout=10
    )


def test_json_rpc_over_http(chain: DevChain, server: DevChainServer) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    answer = post(server, {"jsonrpc": "2.0", "id": 7, "method": "eth_chainId", "params": []})
    assert answer.status_code == 200
    assert answer.json() == {"jsonrpc": "2.0", "id": 7, "result": hex(CHAIN_ID)}
    holder = chain.accounts[4].address
    balance = post(
        server,
        {"jsonrpc": "2.0", "id": "b", "method": "eth_getBalance", "params": [holder, "latest"]},
    )
    assert balance.json()["result"] == hex(chain.eth_balance(holder))
    call = {"to": chain.token, "data": balance_data(holder)}
    usdc = post(
        server, {"jsonrpc": "2.0", "id": None, "method": "eth_call", "params": [call, "latest"]}
    )
    assert int(usdc.json()["result"], 16) == chain.balance_of(holder)
    receiver = EvmAccount.generate().address
    raw = signed_transfer(chain, chain.accounts[4].account, receiver, 77)
    sent = post(
        server, {"jsonrpc": "2.0", "id": 1, "method": "eth_sendRawTransaction", "params": [raw]}
    )
    receipt = post(
        server,
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "eth_getTransactionReceipt",
            "params": [sent.json()["result"]],
        },
    )
    assert receipt.json()["result"]["status"] == "0x1"
    assert chain.balance_of(receiver) == 77


def test_http_batches_notifications_and_errors(server: DevChainServer) -> None:
    batch = post(
        server,
        [
            {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"},
            {"jsonrpc": "2.0", "method": "eth_blockNumber", "params": []},  # a notification
            {"jsonrpc": "2.0", "id": "x", "method": "eth_nothing", "params": []},
            {"jsonrpc": "2.0", "id": 3, "method": "eth_getBalance", "params": {"address": "0x00"}},
            5,
        ],
    ).json()
    assert batch[0] == {"jsonrpc": "2.0", "id": 1, "result": hex(CHAIN_ID)}
    assert batch[1]["id"] == "x"
    assert batch[1]["error"]["code"] == -32601
    assert batch[2]["id"] == 3
    assert batch[2]["error"]["code"] == -32602
    assert batch[3] == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "invalid request: expected an object"},
    }
    assert len(batch) == 4
    only_notification = post(server, {"jsonrpc": "2.0", "method": "eth_chainId"})
    assert only_notification.status_code == 204
    malformed = post(server, b'{"jsonrpc": "2.0", "id": 1, "method": ')
    assert malformed.status_code == 200
    assert malformed.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "parse error"},
    }
    for request in ([], {"id": 1, "method": "eth_chainId"}, {"jsonrpc": "2.0", "id": 1}, "hello"):
        answer = post(server, request).json()
        assert answer["error"]["code"] == -32600, request
    revert = post(
        server,
        {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "eth_call",
            "params": [
                {"to": DEVCHAIN_TOKEN, "data": "0xa9059cbb" + "00" * 12 + "11" * 20 + "ff" * 32}
            ],
        },
    ).json()
    assert revert["error"]["code"] == 3
    assert revert["error"]["message"] == "execution reverted: ERC20: transfer from the zero address"
    assert revert["error"]["data"].startswith("0x08c379a0")
    assert httpx.get(server.url, timeout=10).status_code == 405
    options = httpx.options(server.url, timeout=10)
    assert options.status_code == 204
    assert options.headers["access-control-allow-origin"] == "*"


def test_http_refuses_oversized_bodies_unread(server: DevChainServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.putrequest("POST", "/")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert orjson.loads(response.read())["error"]["code"] == -32600
    finally:
        connection.close()
    # With "Expect: 100-continue" the refusal comes before the body is sent.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {2 * MAX_BODY_BYTES}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert raw.recv(64).startswith(b"HTTP/1.1 413")
    # The server still serves.
    answer = post(server, {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"})
    assert answer.json()["result"] == hex(CHAIN_ID)


async def test_farebox_http_rpc_client_against_the_server(
    chain: DevChain, server: DevChainServer
) -> None:
    rpc = HttpRpc(server.url)
    try:
        assert await rpc.request("eth_chainId") == hex(CHAIN_ID)
        with pytest.raises(RpcError) as caught:
            await rpc.request(
                "eth_call",
                [
                    {
                        "from": chain.accounts[2].address,
                        "to": chain.token,
                        "data": transfer_data(chain.accounts[3].address, 10**18),
                    }
                ],
            )
        assert caught.value.code == 3
        assert caught.value.data.startswith("0x08c379a0")
    finally:
        await rpc.aclose()


def test_farebox_devchain_command_in_its_own_process() -> None:
    script = (
        "import typer\n"
        "from farebox.cli.devchain import devchain_command\n"
        "app = typer.Typer()\n"
        "app.command()(devchain_command)\n"
        "app()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Serving JSON-RPC"):
                break
        banner = "".join(lines)
        url = re.search(r"RPC URL\s+(\S+)", banner)
        assert url, banner
        assert DEVCHAIN_TOKEN in banner
        assert str(CHAIN_ID) in banner
        assert "test test test test test test test test test test test junk" in banner
        assert STANDARD_ACCOUNTS[0] in banner
        assert "1000 USDC" in banner
        assert ACCOUNT_0_KEY not in banner.lower()
        answer = httpx.post(
            url.group(1), json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}, timeout=10
        )
        assert answer.json()["result"] == hex(CHAIN_ID)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert "stopped" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
