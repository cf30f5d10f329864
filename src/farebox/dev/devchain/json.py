"""The devchain's JSON-RPC values: parameters read strictly, results written as geth writes them.

Quantities are ``0x`` hex without leading zeros, data is ``0x`` hex of whole bytes, and a revert or
an EVM failure becomes the error object geth and anvil answer. The JSON shapes of transactions,
receipts, logs and blocks are geth's field for field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import rlp  # type: ignore[import-untyped]
from eth._utils.address import generate_contract_address
from eth.abc import BlockAPI, BlockHeaderAPI, LogAPI, ReceiptAPI, SignedTransactionAPI
from eth.exceptions import (
    InvalidInstruction,
    InvalidJumpDestination,
    OutOfGas,
    Revert,
    StackDepthLimit,
    VMError,
    WriteProtection,
)
from eth_abi.abi import decode as abi_decode
from eth_typing import Address, Hash32

from farebox.ledgers.rpc import RpcError
from farebox.money import DEVCHAIN_USDC

__all__ = ["revert_error"]

_ZERO_ADDRESS: Final = Address(b"\0" * 20)
_ERROR_SELECTOR: Final = bytes.fromhex("08c379a0")  # Error(string)
_PANIC_SELECTOR: Final = bytes.fromhex("4e487b71")  # Panic(uint256)
# Solidity's panic codes, worded as geth words them.
_PANIC_REASONS: Final = {
    0x00: "generic panic",
    0x01: "assert(false)",
    0x11: "arithmetic underflow or overflow",
    0x12: "division or modulo by zero",
    0x21: "enum overflow",
    0x22: "invalid encoded storage byte array accessed",
    0x31: "out-of-bounds array access; popping on an empty array",
    0x32: "out-of-bounds access of an array or bytesN",
    0x41: "out of memory",
    0x51: "uninitialized function",
}
# geth's wording of EVM failures that are not reverts.
_VM_ERRORS: Final[tuple[tuple[type[VMError], str], ...]] = (
    (OutOfGas, "out of gas"),
    (InvalidInstruction, "invalid opcode"),
    (InvalidJumpDestination, "invalid jump destination"),
    (StackDepthLimit, "max call depth exceeded"),
    (WriteProtection, "write protection"),
)
# The most one data parameter may carry (a bound on what one request can make the chain do).
_MAX_DATA_BYTES: Final = 512 * 1024
# Transaction types (EIP-2718).
_LEGACY_TX_TYPE: Final = 0
_ACCESS_LIST_TX_TYPE: Final = 1
_DYNAMIC_FEE_TX_TYPE: Final = 2
_BLOB_TX_TYPE: Final = 3
_SET_CODE_TX_TYPE: Final = 4
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")


def _invalid(message: str) -> RpcError:
    return RpcError(-32602, message)


def _failed(message: str) -> RpcError:
    return RpcError(-32000, message)


def _base_fee(header: BlockHeaderAPI) -> int:
    # Every block of this chain is post-London; py-evm types the field as optional.
    return header.base_fee_per_gas or 0


def _quantity_out(value: int) -> str:
    return hex(value)


def _data_out(value: bytes) -> str:
    return "0x" + value.hex()


def _word_out(value: int) -> str:
    return "0x" + value.to_bytes(32, "big").hex()


def _param(params: Sequence[Any], index: int, name: str, *, required: bool = True) -> Any:
    if index < len(params):
        return params[index]
    if required:
        raise _invalid(f"missing value for required argument {index} ({name})")
    return None


def _hex_body(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.startswith(("0x", "0X")):
        raise _invalid(f"{name}: expected a 0x-prefixed hex string")
    body = value[2:]
    if not _HEX_DIGITS.issuperset(body):
        raise _invalid(f"{name}: invalid hex string")
    return body


def _quantity(value: Any, name: str, *, bits: int = 256) -> int:
    """A JSON-RPC quantity: ``0x`` hex (leading zeros tolerated, as anvil does) or a JSON integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        body = _hex_body(value, name)
        if not body or len(body) > 64:
            raise _invalid(f"{name}: invalid hex quantity")
        number = int(body, 16)
    if not 0 <= number < 2**bits:
        raise _invalid(f"{name}: quantity out of range")
    return number


def _data(value: Any, name: str, *, max_bytes: int = _MAX_DATA_BYTES) -> bytes:
    body = _hex_body(value, name)
    if len(body) % 2 or len(body) > 2 * max_bytes:
        raise _invalid(f"{name}: expected an even number of hex digits, at most {max_bytes} bytes")
    return bytes.fromhex(body)


def _fixed(value: Any, name: str, size: int) -> bytes:
    raw = _data(value, name, max_bytes=size)
    if len(raw) != size:
        raise _invalid(f"{name}: expected {size} bytes")
    return raw


def _address(value: Any, name: str) -> Address:
    return Address(_fixed(value, name, 20))


def _hash(value: Any, name: str) -> Hash32:
    return Hash32(_fixed(value, name, 32))


def _bool(value: Any, name: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(f"{name}: expected a boolean")
    return value


def revert_error(output: bytes) -> RpcError:
    """The JSON-RPC error geth and anvil give for a revert with ``output`` as the revert data.

    Code 3, ``"execution reverted: <reason>"`` when the data is an ``Error(string)`` or a
    ``Panic(uint256)``, and the data as hex; an empty revert is geth's plain -32000.
    """
    if not output:
        return _failed("execution reverted")
    message = "execution reverted"
    if output[:4] == _ERROR_SELECTOR:
        try:
            (reason,) = abi_decode(["string"], output[4:])
        except Exception:  # noqa: S110 - undecodable reason: the data alone is reported, as geth does
            pass
        else:
            message = f"execution reverted: {reason}"
    elif output[:4] == _PANIC_SELECTOR and len(output) == 36:
        code = int.from_bytes(output[4:], "big")
        message = (
            f"execution reverted: {_PANIC_REASONS.get(code, f'unknown panic code: {code:#x}')}"
        )
    return RpcError(3, message, _data_out(output))


def _vm_failure(error: VMError, output: bytes) -> RpcError:
    if isinstance(error, Revert):
        return revert_error(output)
    for kind, text in _VM_ERRORS:
        if isinstance(error, kind):
            return _failed(text)
    return _failed(f"execution failed: {type(error).__name__}")


@dataclass(frozen=True, slots=True)
class _TxRequest:
    """A transaction object of eth_call, eth_estimateGas and eth_sendTransaction."""

    sender: Address
    to: Address  # b"" creates a contract
    gas: int | None
    gas_price: int | None
    max_fee: int | None
    max_priority_fee: int | None
    value: int
    data: bytes
    nonce: int | None
    access_list: tuple[tuple[Address, tuple[int, ...]], ...] | None

    @property
    def priced(self) -> bool:
        """Whether the caller named a fee (else calls and estimates run at zero price, as geth)."""
        return (
            self.gas_price is not None
            or self.max_fee is not None
            or self.max_priority_fee is not None
        )


def _tx_request(value: Any) -> _TxRequest:
    if not isinstance(value, Mapping):
        raise _invalid("transaction: expected an object")
    data = value.get("data")
    tx_input = value.get("input")
    if data is not None and tx_input is not None and data != tx_input:
        raise _invalid('both "data" and "input" are set and not equal')
    payload = tx_input if tx_input is not None else data
    access_list = value.get("accessList")
    gas_price = value.get("gasPrice")
    max_fee = value.get("maxFeePerGas")
    if gas_price is not None and (
        max_fee is not None or value.get("maxPriorityFeePerGas") is not None
    ):
        raise _invalid("both gasPrice and (maxFeePerGas or maxPriorityFeePerGas) specified")
    to = value.get("to")
    return _TxRequest(
        sender=_ZERO_ADDRESS if value.get("from") is None else _address(value["from"], "from"),
        to=Address(b"") if to is None else _address(to, "to"),
        gas=None if value.get("gas") is None else _quantity(value["gas"], "gas", bits=64),
        gas_price=None if gas_price is None else _quantity(gas_price, "gasPrice"),
        max_fee=None if max_fee is None else _quantity(max_fee, "maxFeePerGas"),
        max_priority_fee=(
            None
            if value.get("maxPriorityFeePerGas") is None
            else _quantity(value["maxPriorityFeePerGas"], "maxPriorityFeePerGas")
        ),
        value=0 if value.get("value") is None else _quantity(value["value"], "value"),
        data=b"" if payload is None else _data(payload, "input"),
        nonce=None if value.get("nonce") is None else _quantity(value["nonce"], "nonce", bits=64),
        access_list=None if access_list is None else _access_list(access_list),
    )


def _access_list(value: Any) -> tuple[tuple[Address, tuple[int, ...]], ...]:
    if not isinstance(value, list) or len(value) > 1024:
        raise _invalid("accessList: expected a list")
    entries = []
    for item in value:
        if not isinstance(item, Mapping) or not isinstance(item.get("storageKeys", []), list):
            raise _invalid("accessList: expected {address, storageKeys} objects")
        keys = tuple(
            int.from_bytes(_hash(key, "accessList.storageKeys"), "big")
            for key in item.get("storageKeys", [])
        )
        entries.append((_address(item.get("address"), "accessList.address"), keys))
    return tuple(entries)


class _Pending:
    """The block being built: ``pending`` in a block reference."""


_PENDING: Final = _Pending()


# --- JSON shapes ---------------------------------------------------------------------------------


def _tx_json(
    transaction: SignedTransactionAPI, block: BlockAPI | None, index: int | None
) -> dict[str, Any]:
    type_id = transaction.type_id or _LEGACY_TX_TYPE
    out: dict[str, Any] = {
        "blockHash": None if block is None else _data_out(block.hash),
        "blockNumber": None if block is None else _quantity_out(block.number),
        "from": _data_out(transaction.sender),
        "gas": _quantity_out(transaction.gas),
        "gasPrice": _quantity_out(_effective_price(transaction, block)),
        "hash": _data_out(transaction.hash),
        "input": _data_out(transaction.data),
        "nonce": _quantity_out(transaction.nonce),
        "to": _data_out(transaction.to) if transaction.to else None,
        "transactionIndex": None if index is None else _quantity_out(index),
        "value": _quantity_out(transaction.value),
        "type": _quantity_out(type_id),
    }
    if type_id == _LEGACY_TX_TYPE:
        v = int(getattr(transaction, "v", 0))
        if v >= 35:
            out["chainId"] = _quantity_out((v - 35) // 2)
        out["v"] = _quantity_out(v)
    else:
        out["chainId"] = _quantity_out(transaction.chain_id or DEVCHAIN_USDC.chain_id)
        out["accessList"] = [
            {
                "address": _data_out(address),
                "storageKeys": [_word_out(key) for key in keys],
            }
            for address, keys in transaction.access_list
        ]
        if type_id >= _DYNAMIC_FEE_TX_TYPE:
            out["maxFeePerGas"] = _quantity_out(transaction.max_fee_per_gas)
            out["maxPriorityFeePerGas"] = _quantity_out(transaction.max_priority_fee_per_gas)
        if type_id == _SET_CODE_TX_TYPE:
            out["authorizationList"] = [
                {
                    "chainId": _quantity_out(auth.chain_id),
                    "address": _data_out(auth.address),
                    "nonce": _quantity_out(auth.nonce),
                    "yParity": _quantity_out(auth.y_parity),
                    "r": _quantity_out(auth.r),
                    "s": _quantity_out(auth.s),
                }
                for auth in getattr(transaction, "authorization_list", ())
            ]
        out["v"] = _quantity_out(transaction.y_parity)
        out["yParity"] = _quantity_out(transaction.y_parity)
    out["r"] = _quantity_out(transaction.r)
    out["s"] = _quantity_out(transaction.s)
    return out


def _effective_price(transaction: SignedTransactionAPI, block: BlockAPI | None) -> int:
    if (transaction.type_id or 0) < _DYNAMIC_FEE_TX_TYPE:
        return int(transaction.max_fee_per_gas)  # the gas price, for legacy and type 1
    if block is None:
        return int(transaction.max_fee_per_gas)
    return min(
        transaction.max_fee_per_gas,
        transaction.max_priority_fee_per_gas + _base_fee(block.header),
    )


def _log_json(
    log: LogAPI, block: BlockAPI, transaction: SignedTransactionAPI, index: int, log_index: int
) -> dict[str, Any]:
    return {
        "address": _data_out(log.address),
        "topics": [_word_out(topic) for topic in log.topics],
        "data": _data_out(log.data),
        "blockHash": _data_out(block.hash),
        "blockNumber": _quantity_out(block.number),
        "transactionHash": _data_out(transaction.hash),
        "transactionIndex": _quantity_out(index),
        "logIndex": _quantity_out(log_index),
        "removed": False,
    }


def _receipt_json(block: BlockAPI, receipts: Sequence[ReceiptAPI], index: int) -> dict[str, Any]:
    transaction = block.transactions[index]
    receipt = receipts[index]
    previous = receipts[index - 1].gas_used if index else 0
    first_log = sum(len(r.logs) for r in receipts[:index])
    created = (
        _data_out(generate_contract_address(transaction.sender, transaction.nonce))
        if not transaction.to
        else None
    )
    return {
        "blockHash": _data_out(block.hash),
        "blockNumber": _quantity_out(block.number),
        "contractAddress": created,
        "cumulativeGasUsed": _quantity_out(receipt.gas_used),
        "effectiveGasPrice": _quantity_out(_effective_price(transaction, block)),
        "from": _data_out(transaction.sender),
        "gasUsed": _quantity_out(receipt.gas_used - previous),
        "logs": [
            _log_json(log, block, transaction, index, first_log + offset)
            for offset, log in enumerate(receipt.logs)
        ],
        "logsBloom": _data_out(int(receipt.bloom).to_bytes(256, "big")),
        "status": "0x1" if receipt.state_root == b"\x01" else "0x0",
        "to": _data_out(transaction.to) if transaction.to else None,
        "transactionHash": _data_out(transaction.hash),
        "transactionIndex": _quantity_out(index),
        "type": _quantity_out(transaction.type_id or _LEGACY_TX_TYPE),
    }


def _block_json(block: BlockAPI, full: bool, *, pending: bool = False) -> dict[str, Any]:
    header = block.header
    out: dict[str, Any] = {
        "hash": None if pending else _data_out(header.hash),
        "parentHash": _data_out(header.parent_hash),
        "sha3Uncles": _data_out(header.uncles_hash),
        "miner": _data_out(header.coinbase),
        "stateRoot": _data_out(header.state_root),
        "transactionsRoot": _data_out(header.transaction_root),
        "receiptsRoot": _data_out(header.receipt_root),
        "logsBloom": _data_out(int(header.bloom).to_bytes(256, "big")),
        "difficulty": _quantity_out(header.difficulty),
        "number": _quantity_out(header.block_number),
        "gasLimit": _quantity_out(header.gas_limit),
        "gasUsed": _quantity_out(header.gas_used),
        "timestamp": _quantity_out(header.timestamp),
        "extraData": _data_out(header.extra_data),
        "mixHash": _data_out(header.mix_hash),
        "nonce": None if pending else _data_out(header.nonce),
        "baseFeePerGas": _quantity_out(_base_fee(header)),
        "size": _quantity_out(len(rlp.encode(block))),
        "uncles": [],
        "transactions": [
            _tx_json(transaction, None if pending else block, None if pending else i)
            if full
            else _data_out(transaction.hash)
            for i, transaction in enumerate(block.transactions)
        ],
    }
    withdrawals_root = getattr(header, "withdrawals_root", None)
    if withdrawals_root is not None:
        out["withdrawals"] = []
        out["withdrawalsRoot"] = _data_out(withdrawals_root)
    for field, name in (("blob_gas_used", "blobGasUsed"), ("excess_blob_gas", "excessBlobGas")):
        value = getattr(header, field, None)
        if value is not None:
            out[name] = _quantity_out(value)
    for field, name in (
        ("parent_beacon_block_root", "parentBeaconBlockRoot"),
        ("requests_hash", "requestsHash"),
    ):
        value = getattr(header, field, None)
        if value is not None:
            out[name] = _data_out(value)
    return out
