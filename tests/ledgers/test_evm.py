"""The settlement helpers that need no chain: calldata, RLP, transaction signing, revert mapping."""

from __future__ import annotations

import os

import pytest
from eth_account import Account
from hexbytes import HexBytes

from farebox.eth import EvmAccount
from farebox.ledgers.evm import (
    EvmLedger,
    _is_already_known,
    _is_nonce_race,
    _rlp,
    code_for_revert,
    encode_transfer_with_authorization,
    revert_reason,
)
from farebox.ledgers.rpc import RpcError
from farebox.money import BASE_SEPOLIA_USDC
from farebox.protocol.models import Offer
from farebox.schemes.evm_exact import make_proof, verify


def test_rlp_known_vectors() -> None:
    # From the Ethereum RLP specification's examples.
    assert _rlp(b"dog") == bytes.fromhex("83646f67")
    assert _rlp([b"cat", b"dog"]) == bytes.fromhex("c88363617483646f67")
    assert _rlp(b"") == b"\x80"
    assert _rlp([]) == b"\xc0"
    assert _rlp(0) == b"\x80"
    assert _rlp(15) == b"\x0f"
    assert _rlp(1024) == bytes.fromhex("820400")
    assert _rlp([[], [[]], [[], [[]]]]) == bytes.fromhex("c7c0c1c0c3c0c1c0")
    long = b"Lorem ipsum dolor sit amet, consectetur adipisicing elit"
    assert _rlp(long) == bytes.fromhex("b838") + long


def test_signed_transaction_recovers_to_the_settler() -> None:
    settler = EvmAccount.generate()
    ledger = EvmLedger(_NoRpc(), settler, network="eip155:84532")
    raw = ledger._sign_1559(7, 3 * 10**9, 10**9, BASE_SEPOLIA_USDC.address, b"\x01\x02")
    assert Account.recover_transaction(raw) == settler.address
    from eth_account.typed_transactions import TypedTransaction

    tx = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
    assert tx["nonce"] == 7
    assert tx["chainId"] == 84532
    assert tx["gas"] == ledger.gas_limit
    assert tx["data"] == b"\x01\x02"


def test_calldata_layout() -> None:
    payer = EvmAccount.generate()
    offer = Offer(
        "exact",
        "eip155:84532",
        10_000,
        BASE_SEPOLIA_USDC.address,
        "0x" + "22" * 20,
        extra={"name": "USDC", "version": "2"},
    )
    proof = make_proof(payer, offer, now=1_800_000_000, nonce=os.urandom(32))
    verified = verify(proof, offer, now=1_800_000_000)
    data = encode_transfer_with_authorization(verified)
    assert data[:4].hex() == "e3ee160e"
    assert len(data) == 4 + 9 * 32
    assert data[4 + 12 : 4 + 32] == bytes.fromhex(payer.address[2:])
    assert int.from_bytes(data[4 + 64 : 4 + 96], "big") == 10_000
    assert int.from_bytes(data[4 + 192 : 4 + 224], "big") in (27, 28)


def _error_data(text: str) -> str:
    raw = text.encode()
    return (
        "0x08c379a0"
        + (32).to_bytes(32, "big").hex()
        + len(raw).to_bytes(32, "big").hex()
        + raw.ljust((len(raw) + 31) // 32 * 32, b"\0").hex()
    )


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("FiatTokenV2: authorization is used or canceled", "invalid_exact_evm_nonce_already_used"),
        (
            "FiatTokenV2: authorization is expired",
            "invalid_exact_evm_payload_authorization_valid_before",
        ),
        (
            "FiatTokenV2: authorization is not yet valid",
            "invalid_exact_evm_payload_authorization_valid_after",
        ),
        ("FiatTokenV2: invalid signature", "invalid_exact_evm_payload_signature"),
        ("ERC20: transfer amount exceeds balance", "invalid_exact_evm_insufficient_balance"),
        ("Pausable: paused", "transaction_failed"),
    ],
)
def test_revert_texts_map_to_x402_codes(text: str, code: str) -> None:
    error = RpcError(3, f"execution reverted: {text}", _error_data(text))
    assert revert_reason(error) == text
    assert code_for_revert(text) == code
    # Nodes that give only the message still map.
    assert (
        code_for_revert(revert_reason(RpcError(-32000, f"execution reverted: {text}")) or "")
        == code
    )


def test_non_revert_errors_are_not_reverts() -> None:
    assert revert_reason(RpcError(-32000, "nonce too low")) is None
    assert revert_reason(RpcError(3, "execution reverted", "0x08c379a0ff")) == "execution reverted"


@pytest.mark.parametrize(
    ("message", "race"),
    [
        ("nonce too low: address 0x70997970C51812dc3A010C7d01b50e0d17dc79C8, tx: 4 state: 5", True),
        ("nonce too low: next nonce 7, tx nonce 5", True),  # geth
        ("nonce too high", True),
        ("already known", False),  # this very transaction is pooled: it was sent
        ("replacement transaction underpriced", True),
        ("Nonce too low", True),  # anvil
        ("NONCE_TOO_LOW", True),  # Besu
        ("REPLACEMENT_UNDERPRICED", True),
        ("OldNonce, Current nonce: 6, nonce of rejected tx: 5", True),  # Nethermind
        ("AlreadyKnown", False),
        ("insufficient funds for gas * price + value", False),
        ("max fee per gas less than block base fee", False),
        ("intrinsic gas too low", False),
        ("exceeds block gas limit", False),
    ],
)
def test_a_nonce_taken_elsewhere_is_told_from_a_failed_send(message: str, race: bool) -> None:
    assert _is_nonce_race(RpcError(-32000, message)) is race
    known = "known" in message.lower()
    assert _is_already_known(RpcError(-32000, message)) is known


class _NoRpc:
    async def request(self, method: str, params: object = ()) -> object:
        raise AssertionError("no I/O expected")
