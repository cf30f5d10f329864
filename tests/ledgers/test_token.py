"""The development token: built from its committed source, and behaving as USDC (FiatTokenV2_2).

Everything goes through ``DevChain.handle`` / ``DevChain.rpc``, as settlement code sees the chain:
calls, transactions and reverts in their JSON-RPC shapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from eth_abi.abi import decode, encode

from farebox.dev import contracts
from farebox.dev.contracts import compile_token, load_token
from farebox.dev.devchain import DevChain
from farebox.eth import SECP256K1_N, EvmAccount, address_bytes, keccak256
from farebox.ledgers.rpc import RpcError
from farebox.money import BASE_SEPOLIA_USDC
from farebox.schemes.evm_exact import Authorization, authorization_digest, domain_separator

pytestmark = pytest.mark.anyio

TRANSFER_TYPE = (
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)
RECEIVE_TYPE = (
    b"ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)
CANCEL_TYPE = b"CancelAuthorization(address authorizer,bytes32 nonce)"
AUTH_ARGS = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"]  # fmt: skip
TOPIC_TRANSFER = "0x" + keccak256(b"Transfer(address,address,uint256)").hex()
TOPIC_USED = "0x" + keccak256(b"AuthorizationUsed(address,bytes32)").hex()
TOPIC_CANCELED = "0x" + keccak256(b"AuthorizationCanceled(address,bytes32)").hex()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def selector(signature: str) -> bytes:
    return keccak256(signature.encode())[:4]


def call_data(signature: str, types: list[str], values: list[Any]) -> str:
    return "0x" + (selector(signature) + encode(types, values)).hex()


def error_data(text: str) -> str:
    return "0x08c379a0" + encode(["string"], [text]).hex()


def funded_payer(chain: DevChain, amount: int = 1_000_000) -> EvmAccount:
    payer = EvmAccount.generate()
    chain.mint(payer.address, amount)
    return payer


def sign_vrs(
    account: EvmAccount, typehash_source: bytes, fields: bytes, token: str, chain: DevChain
) -> tuple[int, bytes, bytes]:
    separator = domain_separator("USD Coin", "2", chain.chain_id, token)
    struct_hash = keccak256(keccak256(typehash_source) + fields)
    signature = account.sign_digest(keccak256(b"\x19\x01" + separator + struct_hash))
    return signature[64], signature[:32], signature[32:64]


def transfer_call(
    chain: DevChain,
    payer: EvmAccount,
    to: str,
    value: int,
    *,
    valid_after: int | None = None,
    valid_before: int | None = None,
    nonce: bytes | None = None,
    signer: EvmAccount | None = None,
    token: str | None = None,
    function: str = "transferWithAuthorization",
) -> tuple[str, Authorization]:
    """Calldata of a signed EIP-3009 transfer, signed as farebox's payers sign it."""
    now = chain.now()
    authorization = Authorization(
        from_=address_bytes(payer.address),
        to=address_bytes(to),
        value=value,
        valid_after=now - 600 if valid_after is None else valid_after,
        valid_before=now + 300 if valid_before is None else valid_before,
        nonce=os.urandom(32) if nonce is None else nonce,
    )
    token = token or chain.token
    if function == "transferWithAuthorization":
        separator = domain_separator("USD Coin", "2", chain.chain_id, token)
        signature = (signer or payer).sign_digest(authorization_digest(authorization, separator))
        v, r, s = signature[64], signature[:32], signature[32:64]
    else:
        fields = encode(
            ["address", "address", "uint256", "uint256", "uint256", "bytes32"],
            [
                authorization.from_,
                authorization.to,
                value,
                authorization.valid_after,
                authorization.valid_before,
                authorization.nonce,
            ],
        )
        v, r, s = sign_vrs(signer or payer, RECEIVE_TYPE, fields, token, chain)
    data = call_data(
        f"{function}(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)",
        AUTH_ARGS,
        [
            authorization.from_,
            authorization.to,
            value,
            authorization.valid_after,
            authorization.valid_before,
            authorization.nonce,
            v,
            r,
            s,
        ],
    )
    return data, authorization


def send(chain: DevChain, sender: str, to: str, data: str, gas: int = 200_000) -> dict[str, Any]:
    """Send from an unlocked dev account with explicit gas (mined even if it reverts)."""
    tx_hash = chain.handle(
        "eth_sendTransaction", [{"from": sender, "to": to, "data": data, "gas": hex(gas)}]
    )
    receipt = chain.handle("eth_getTransactionReceipt", [tx_hash])
    assert isinstance(receipt, dict)
    return receipt


def revert_of(
    chain: DevChain, data: str, *, sender: str | None = None, to: str | None = None
) -> RpcError:
    call = {"to": to or chain.token, "data": data}
    if sender is not None:
        call["from"] = sender
    with pytest.raises(RpcError) as caught:
        chain.handle("eth_call", [call, "latest"])
    return caught.value


def view(
    chain: DevChain,
    signature: str,
    types: list[str] | None = None,
    values: list[Any] | None = None,
    *,
    to: str | None = None,
) -> str:
    result = chain.handle(
        "eth_call",
        [{"to": to or chain.token, "data": call_data(signature, types or [], values or [])}],
    )
    assert isinstance(result, str)
    return result


# --- the artifact ---------------------------------------------------------------------------------


def test_committed_artifact_is_what_the_source_compiles_to() -> None:
    pytest.importorskip("vyper", reason="vyper is needed to recompile the token")
    committed = orjson.loads(Path(contracts.__file__).with_name("usdc.json").read_bytes())
    rebuilt = compile_token()
    assert rebuilt["bytecode"] == committed["bytecode"]
    assert rebuilt["runtimeBytecode"] == committed["runtimeBytecode"]
    assert rebuilt == committed


def test_artifact_has_usdcs_selectors_and_settings() -> None:
    artifact = load_token()
    ids = artifact.method_identifiers
    signature = "(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
    assert ids["transferWithAuthorization" + signature] == "0xe3ee160e"
    assert ids["receiveWithAuthorization" + signature] == "0xef55bec6"
    assert ids["cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)"] == "0x5a049a70"
    assert ids["authorizationState(address,bytes32)"] == "0xe94a0102"
    assert ids["transfer(address,uint256)"] == "0xa9059cbb"
    assert ids["balanceOf(address)"] == "0x70a08231"
    assert artifact.vyper_version == "0.4.3"
    assert artifact.settings["evm_version"] == "cancun"
    assert len(artifact.runtime_bytecode) < 24_576  # EIP-170


# --- the deployed token ---------------------------------------------------------------------------


def test_metadata_and_domain(chain: DevChain) -> None:
    def text(signature: str) -> str:
        raw = bytes.fromhex(view(chain, signature)[2:])
        return str(decode(["string"], raw)[0])

    assert text("name()") == "USD Coin"
    assert text("symbol()") == "USDC"
    assert text("version()") == "2"
    assert int(view(chain, "decimals()"), 16) == 6
    assert int(view(chain, "owner()"), 16) == int(chain.accounts[0].address, 16)
    assert int(view(chain, "totalSupply()"), 16) >= 10 * 1_000 * 10**6
    for name, source in (
        ("TRANSFER_WITH_AUTHORIZATION_TYPEHASH", TRANSFER_TYPE),
        ("RECEIVE_WITH_AUTHORIZATION_TYPEHASH", RECEIVE_TYPE),
        ("CANCEL_AUTHORIZATION_TYPEHASH", CANCEL_TYPE),
    ):
        assert view(chain, f"{name}()") == "0x" + keccak256(source).hex()
    expected = domain_separator("USD Coin", "2", chain.chain_id, chain.token)
    assert view(chain, "DOMAIN_SEPARATOR()") == "0x" + expected.hex()
    assert chain.asset.name == "USD Coin"
    assert chain.asset.version == "2"
    assert chain.asset.decimals == 6
    assert chain.asset.peg == "USD"


async def test_transfer_with_authorization_moves_money_and_logs(chain: DevChain) -> None:
    payer = funded_payer(chain)
    payee = EvmAccount.generate().address
    relayer = chain.accounts[4].address
    data, authorization = transfer_call(chain, payer, payee, 250_000)
    rpc = chain.rpc
    assert (
        await rpc.request(
            "eth_call", [{"from": relayer, "to": chain.token, "data": data}, "latest"]
        )
        == "0x"
    )
    tx_hash = await rpc.request(
        "eth_sendTransaction", [{"from": relayer, "to": chain.token, "data": data}]
    )
    receipt = await rpc.request("eth_getTransactionReceipt", [tx_hash])
    assert receipt["status"] == "0x1"
    assert chain.balance_of(payer.address) == 750_000
    assert chain.balance_of(payee) == 250_000
    used, transfer = receipt["logs"]
    assert used["topics"] == [
        TOPIC_USED,
        "0x" + authorization.from_.rjust(32, b"\0").hex(),
        "0x" + authorization.nonce.hex(),
    ]
    assert transfer["topics"] == [
        TOPIC_TRANSFER,
        "0x" + authorization.from_.rjust(32, b"\0").hex(),
        "0x" + authorization.to.rjust(32, b"\0").hex(),
    ]
    assert int(transfer["data"], 16) == 250_000
    assert {used["address"], transfer["address"]} == {chain.token.lower()}
    assert [used["logIndex"], transfer["logIndex"]] == ["0x0", "0x1"]
    state = await rpc.request(
        "eth_call",
        [
            {
                "to": chain.token,
                "data": call_data(
                    "authorizationState(address,bytes32)",
                    ["address", "bytes32"],
                    [payer.address, authorization.nonce],
                ),
            }
        ],
    )
    assert int(state, 16) == 1


@pytest.mark.parametrize(
    ("case", "text"),
    [
        ("not_yet_valid", "FiatTokenV2: authorization is not yet valid"),
        ("expired", "FiatTokenV2: authorization is expired"),
        ("wrong_signer", "FiatTokenV2: invalid signature"),
        ("high_s", "ECRecover: invalid signature 's' value"),
        ("bad_v", "ECRecover: invalid signature 'v' value"),
        ("no_signer", "ECRecover: invalid signature"),
        ("insufficient_balance", "ERC20: transfer amount exceeds balance"),
        ("to_zero_address", "ERC20: transfer to the zero address"),
    ],
)
def test_revert_texts_are_usdcs(chain: DevChain, case: str, text: str) -> None:
    payer = funded_payer(chain, 1_000)
    payee = EvmAccount.generate().address
    now = chain.now()
    arguments: dict[str, Any] = {
        "not_yet_valid": {"valid_after": now + 3600},
        "expired": {"valid_before": now - 1},
        "wrong_signer": {"signer": EvmAccount.generate()},
    }.get(case, {})
    value = 1_001 if case == "insufficient_balance" else 10
    to = "0x" + "00" * 20 if case == "to_zero_address" else payee
    data, _ = transfer_call(chain, payer, to, value, **arguments)
    raw = bytes.fromhex(data[2:])
    if case == "high_s":
        s = int.from_bytes(raw[-32:], "big")
        v = raw[-65]
        raw = raw[:-65] + bytes([55 - v]) + raw[-64:-32] + (SECP256K1_N - s).to_bytes(32, "big")
    elif case == "bad_v":
        raw = raw[:-65] + bytes([29]) + raw[-64:]
    elif case == "no_signer":
        raw = raw[:-64] + b"\0" * 32 + raw[-32:]  # r = 0: ecrecover finds nobody
    error = revert_of(chain, "0x" + raw.hex())
    assert error.code == 3
    assert error.message == f"execution reverted: {text}"
    assert error.data == error_data(text)


def test_the_validity_window_is_open_at_both_ends() -> None:
    chain = DevChain()  # its own: the clock is pinned here
    payer = funded_payer(chain)
    payee = EvmAccount.generate().address
    block_time = chain.now() + 100
    chain.handle("evm_setNextBlockTimestamp", [hex(block_time)])
    assert chain.now() == block_time
    at_start, _ = transfer_call(chain, payer, payee, 1, valid_after=block_time)
    assert revert_of(chain, at_start).message.endswith("authorization is not yet valid")
    at_end, _ = transfer_call(chain, payer, payee, 1, valid_before=block_time)
    assert revert_of(chain, at_end).message.endswith("authorization is expired")
    inside, _ = transfer_call(
        chain, payer, payee, 1, valid_after=block_time - 1, valid_before=block_time + 1
    )
    receipt = send(chain, chain.accounts[4].address, chain.token, inside)
    assert receipt["status"] == "0x1"
    block = chain.handle("eth_getBlockByNumber", [receipt["blockNumber"], False])
    assert int(block["timestamp"], 16) == block_time


def test_used_authorization_is_refused_and_checks_run_in_usdcs_order(chain: DevChain) -> None:
    payer = funded_payer(chain)
    payee = EvmAccount.generate().address
    data, authorization = transfer_call(chain, payer, payee, 10)
    assert send(chain, chain.accounts[4].address, chain.token, data)["status"] == "0x1"
    # Replayed as is: the nonce is spent.
    assert revert_of(chain, data).message.endswith("FiatTokenV2: authorization is used or canceled")
    # Time comes first: expired and replayed is "expired"; used and badly signed is "used".
    expired, _ = transfer_call(
        chain, payer, payee, 10, valid_before=chain.now() - 1, nonce=authorization.nonce
    )
    assert revert_of(chain, expired).message.endswith("authorization is expired")
    forged, _ = transfer_call(
        chain, payer, payee, 10, nonce=authorization.nonce, signer=EvmAccount.generate()
    )
    assert revert_of(chain, forged).message.endswith("authorization is used or canceled")
    # A signature check comes before the balance check.
    poor = EvmAccount.generate()
    unfunded, _ = transfer_call(chain, poor, payee, 10, signer=EvmAccount.generate())
    assert revert_of(chain, unfunded).message.endswith("FiatTokenV2: invalid signature")


def test_estimate_gas_reverts_like_eth_call(chain: DevChain) -> None:
    payer = funded_payer(chain, 5)
    data, _ = transfer_call(chain, payer, EvmAccount.generate().address, 6)
    with pytest.raises(RpcError) as caught:
        chain.handle(
            "eth_estimateGas",
            [{"from": chain.accounts[4].address, "to": chain.token, "data": data}],
        )
    text = "ERC20: transfer amount exceeds balance"
    assert (caught.value.code, caught.value.message) == (3, f"execution reverted: {text}")
    assert caught.value.data == error_data(text)


def test_a_reverting_transaction_is_mined_with_status_0(chain: DevChain) -> None:
    payer = funded_payer(chain, 5)
    data, _ = transfer_call(chain, payer, EvmAccount.generate().address, 6)
    receipt = send(chain, chain.accounts[4].address, chain.token, data)
    assert receipt["status"] == "0x0"
    assert receipt["logs"] == []
    assert chain.balance_of(payer.address) == 5


def test_receive_with_authorization_must_be_sent_by_the_payee(chain: DevChain) -> None:
    payer = funded_payer(chain)
    payee = chain.accounts[5].address
    data, _ = transfer_call(chain, payer, payee, 40, function="receiveWithAuthorization")
    error = revert_of(chain, data, sender=chain.accounts[4].address)
    assert error.message == "execution reverted: FiatTokenV2: caller must be the payee"
    # A TransferWithAuthorization signature is not a ReceiveWithAuthorization one.
    transfer_signed, _ = transfer_call(chain, payer, payee, 40)
    swapped = (
        "0x"
        + selector(
            "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
        ).hex()
        + transfer_signed[10:]
    )
    assert revert_of(chain, swapped, sender=payee).message.endswith(
        "FiatTokenV2: invalid signature"
    )
    before = chain.balance_of(payee)
    assert send(chain, payee, chain.token, data)["status"] == "0x1"
    assert chain.balance_of(payee) == before + 40


def test_cancel_authorization(chain: DevChain) -> None:
    payer = funded_payer(chain)
    nonce = os.urandom(32)
    fields = encode(["address", "bytes32"], [payer.address, nonce])
    v, r, s = sign_vrs(payer, CANCEL_TYPE, fields, chain.token, chain)
    cancel = call_data(
        "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)",
        ["address", "bytes32", "uint8", "bytes32", "bytes32"],
        [payer.address, nonce, v, r, s],
    )
    forged_v, forged_r, forged_s = sign_vrs(
        EvmAccount.generate(), CANCEL_TYPE, fields, chain.token, chain
    )
    forged = call_data(
        "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)",
        ["address", "bytes32", "uint8", "bytes32", "bytes32"],
        [payer.address, nonce, forged_v, forged_r, forged_s],
    )
    assert revert_of(chain, forged).message.endswith("FiatTokenV2: invalid signature")
    receipt = send(chain, chain.accounts[6].address, chain.token, cancel)
    assert receipt["status"] == "0x1"
    assert receipt["logs"][0]["topics"][0] == TOPIC_CANCELED
    assert receipt["logs"][0]["topics"][2] == "0x" + nonce.hex()
    data, _ = transfer_call(chain, payer, EvmAccount.generate().address, 1, nonce=nonce)
    assert revert_of(chain, data).message.endswith("authorization is used or canceled")
    assert revert_of(chain, cancel).message.endswith("authorization is used or canceled")


def test_erc20_allowances_and_owner_only_mint(chain: DevChain) -> None:
    holder, spender, stranger = (chain.accounts[i].address for i in (7, 8, 9))
    receiver = EvmAccount.generate().address
    approve = call_data("approve(address,uint256)", ["address", "uint256"], [spender, 100])
    assert send(chain, holder, chain.token, approve)["status"] == "0x1"
    allowance = view(chain, "allowance(address,address)", ["address", "address"], [holder, spender])
    assert int(allowance, 16) == 100
    pull = call_data(
        "transferFrom(address,address,uint256)",
        ["address", "address", "uint256"],
        [holder, receiver, 60],
    )
    assert send(chain, spender, chain.token, pull)["status"] == "0x1"
    assert chain.balance_of(receiver) == 60
    error = revert_of(chain, pull, sender=spender)
    assert error.message == "execution reverted: ERC20: transfer amount exceeds allowance"
    mint = call_data("mint(address,uint256)", ["address", "uint256"], [stranger, 1])
    assert revert_of(chain, mint, sender=stranger).message.endswith(
        "FiatToken: caller is not a minter"
    )
    owner = chain.accounts[0].address
    assert send(chain, owner, chain.token, mint)["status"] == "0x1"
    zero = call_data("mint(address,uint256)", ["address", "uint256"], ["0x" + "00" * 20, 1])
    assert revert_of(chain, zero, sender=owner).message.endswith(
        "FiatToken: mint to the zero address"
    )


def test_runtime_code_copied_elsewhere_uses_the_domain_of_its_new_address(chain: DevChain) -> None:
    elsewhere = "0x" + os.urandom(20).hex()
    code = chain.handle("eth_getCode", [chain.token, "latest"])
    assert chain.handle("anvil_setCode", [elsewhere, code]) is None
    assert chain.handle("eth_getCode", [elsewhere, "latest"]) == code
    expected = domain_separator("USD Coin", "2", chain.chain_id, elsewhere)
    assert view(chain, "DOMAIN_SEPARATOR()", to=elsewhere) == "0x" + expected.hex()
    payer = EvmAccount.generate()
    chain.mint(payer.address, 1_000, token=elsewhere)  # the owner is in the code, not in storage
    assert chain.balance_of(payer.address, token=elsewhere) == 1_000
    assert chain.balance_of(payer.address) == 0
    payee = EvmAccount.generate().address
    for_the_original, _ = transfer_call(chain, payer, payee, 300)
    error = revert_of(chain, for_the_original, to=elsewhere)
    assert error.message.endswith("FiatTokenV2: invalid signature")
    data, _ = transfer_call(chain, payer, payee, 300, token=elsewhere)
    assert send(chain, chain.accounts[4].address, elsewhere, data)["status"] == "0x1"
    assert chain.balance_of(payee, token=elsewhere) == 300


def test_a_token_at_the_base_sepolia_usdc_address(chain: DevChain) -> None:
    asset = chain.deploy_token("USDC", "USDC", at=BASE_SEPOLIA_USDC.address, mint=5_000_000)
    assert asset.address == BASE_SEPOLIA_USDC.address
    assert asset.network == chain.network
    separator = domain_separator("USDC", "2", chain.chain_id, BASE_SEPOLIA_USDC.address)
    assert view(chain, "DOMAIN_SEPARATOR()", to=asset.address) == "0x" + separator.hex()
    assert chain.balance_of(chain.accounts[3].address, token=asset.address) == 5_000_000
