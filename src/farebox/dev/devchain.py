"""An EVM chain in this process (py-evm through eth-tester), with a USDC-like token deployed.

``DevChain()`` builds, in well under a second, a chain that settles x402 payments for real:

* the ten development accounts of the mnemonic ``test test test test test test test test test
  test test junk`` (``m/44'/60'/0'/0/i``, as anvil and hardhat; the first is
  ``0xf39F...2266``), each with 10,000 ETH and 1,000 USDC. Their keys are public test keys,
  never to be used for real value; farebox still never prints or logs them;
* the token of :mod:`farebox.dev.contracts` ("USD Coin", "USDC", EIP-712 version "2"),
  deployed by account 0, its owner;
* :meth:`DevChain.handle` answering standard Ethereum JSON-RPC (hex strings like geth and
  anvil), :attr:`DevChain.rpc` serving the same in-process as a :class:`~farebox.ledgers.rpc.Rpc`,
  and :mod:`farebox.dev.rpc_server` serving it over HTTP (``farebox devchain``).

Mining is automatic: every accepted transaction is mined at once in its own block, as anvil does
by default, and a transaction that reverts is mined with status 0 (see :meth:`DevChain.handle`).

The clock. py-evm dates a new pending block when the previous block is mined, at
``max(parent + 1, wall clock)``, and executes transactions at that date: an idle chain runs behind
(an EIP-3009 authorization signed since is "not yet valid") and a busy one runs ahead by one
second per block (1,000 settlements a minute would expire a 300 s authorization within 20 s).
DevChain instead stamps each block just before it executes anything: the wall clock when it has
passed the parent's timestamp, else the parent's timestamp + 1, except that a block never leads
the wall clock by more than one second; past that, blocks share their parent's timestamp (the VM
is patched to accept equal timestamps, as hardhat's ``allowBlocksWithSameTimestamp``). So a block's
timestamp ``t`` always satisfies ``floor(now) <= t <= floor(now) + 1`` whatever the rate of
transactions, unless ``evm_increaseTime`` / ``evm_setNextBlockTimestamp`` move the clock on.
``eth_call`` and ``eth_estimateGas`` at ``latest`` run in the context of that next block (number
head + 1, timestamp :meth:`DevChain.now`), which is what a transaction sent now will see.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, cast

import anyio.to_thread
import rlp  # type: ignore[import-untyped]
from eth._utils.address import generate_contract_address
from eth.abc import (
    BlockAPI,
    BlockHeaderAPI,
    ComputationAPI,
    LogAPI,
    MiningChainAPI,
    ReceiptAPI,
    SignedTransactionAPI,
    StateAPI,
    UnsignedTransactionAPI,
)
from eth.constants import BLANK_ROOT_HASH, GENESIS_PARENT_HASH
from eth.db.schema import SchemaV1
from eth.exceptions import (
    BlockNotFound,
    HeaderNotFound,
    InvalidInstruction,
    InvalidJumpDestination,
    OutOfGas,
    Revert,
    StackDepthLimit,
    TransactionNotFound,
    VMError,
    WriteProtection,
)
from eth.vm.forks.prague import PragueVM
from eth.vm.spoof import SpoofTransaction
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_bloom.bloom import BloomFilter
from eth_keys.datatypes import PrivateKey
from eth_tester.backends.pyevm.main import (  # type: ignore[import-untyped]
    PyEVMBackend,
    generate_genesis_state_for_keys,
    get_account_keys_from_mnemonic,
    get_default_genesis_params,
)
from eth_typing import Address, BlockNumber, Hash32
from eth_utils.exceptions import ValidationError

from farebox.dev.contracts import load_token
from farebox.eth import EvmAccount, address_bytes, checksum_address, keccak256
from farebox.ledgers.rpc import RpcError
from farebox.money import DEVCHAIN_USDC, Asset

__all__ = [
    "CHAIN_ID",
    "DEVCHAIN_NETWORK",
    "DEVCHAIN_TOKEN",
    "ETH_PER_ACCOUNT",
    "MNEMONIC",
    "USDC_PER_ACCOUNT",
    "DevAccount",
    "DevChain",
    "DevChainRpc",
    "revert_error",
]

_log = logging.getLogger(__name__)

MNEMONIC: Final = "test test test test test test test test test test test junk"
HD_PATH: Final = "m/44'/60'/0'/0"
# eth-tester's fixed chain id (py-evm's MainnetTesterPosChain), and where every DevChain deploys
# its token: account 0's first contract (the address anvil and hardhat give it too). Both are in
# farebox.money.DEVCHAIN_USDC, so another process knows the token of a `farebox devchain`.
CHAIN_ID: Final = DEVCHAIN_USDC.chain_id
DEVCHAIN_NETWORK: Final = DEVCHAIN_USDC.network
DEVCHAIN_TOKEN: Final = DEVCHAIN_USDC.address
ETH_PER_ACCOUNT: Final = 10_000 * 10**18
USDC_PER_ACCOUNT: Final = 1_000 * 10**6
TOKEN_NAME: Final = "USD Coin"  # noqa: S105 - a token name, not a secret
TOKEN_SYMBOL: Final = "USDC"  # noqa: S105
TOKEN_VERSION: Final = "2"  # noqa: S105
TOKEN_DECIMALS: Final = 6
# The tip eth_maxPriorityFeePerGas suggests and eth_sendTransaction uses by default (anvil's).
PRIORITY_FEE: Final = 10**9
# How far a block's timestamp may run ahead of the wall clock before blocks share a timestamp.
MAX_CLOCK_LEAD: Final = 1

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
# Bounds on what one request can make the chain do.
_MAX_DATA_BYTES: Final = 512 * 1024
_MAX_FEE_HISTORY_BLOCKS: Final = 1024
_MAX_MINE_BLOCKS: Final = 10_000
_MAX_QUEUED_PER_SENDER: Final = 64
_MAX_QUEUED: Final = 1024
_MAX_SNAPSHOTS: Final = 10_000
_LEGACY_TX_TYPE: Final = 0
_ACCESS_LIST_TX_TYPE: Final = 1
_DYNAMIC_FEE_TX_TYPE: Final = 2
_BLOB_TX_TYPE: Final = 3
_SET_CODE_TX_TYPE: Final = 4
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")

_MINT_SELECTOR: Final = keccak256(b"mint(address,uint256)")[:4]
_BALANCE_OF_SELECTOR: Final = keccak256(b"balanceOf(address)")[:4]


class _DevVM(PragueVM):
    """Prague, except that a block may share its parent's timestamp (see the module docstring)."""

    @classmethod
    def validate_header(cls, header: BlockHeaderAPI, parent_header: BlockHeaderAPI) -> None:
        if header.timestamp == parent_header.timestamp:
            # Everything else is validated as usual: only the strict increase is relaxed.
            header = header.copy(timestamp=header.timestamp + 1)
        super().validate_header(header, parent_header)


@dataclass(frozen=True, slots=True)
class DevAccount:
    """A funded development account. ``account`` signs (EIP-3009 authorizations, transactions).

    Its ``repr`` shows the address only.
    """

    address: str
    account: EvmAccount


@lru_cache(maxsize=4)
def _derive_keys(count: int) -> tuple[PrivateKey, ...]:
    # BIP-39/BIP-32 derivation takes milliseconds per key; every DevChain of a process reuses it.
    keys = get_account_keys_from_mnemonic(MNEMONIC, quantity=count, hd_path=HD_PATH)
    return tuple(cast(PrivateKey, key) for key in keys)


# --- JSON-RPC values ------------------------------------------------------------------------------


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


# --- the chain ------------------------------------------------------------------------------------


class DevChain:
    """An in-process EVM development chain with a USDC-like token and ten funded accounts.

    Thread-safe: one lock serializes every access to the chain (py-evm is not thread-safe), so
    one chain can serve a whole test session, many threads and the HTTP server at once.
    """

    def __init__(self, *, accounts: int = 10) -> None:
        if not 1 <= accounts <= 100:
            raise ValueError("a DevChain has between 1 and 100 accounts")
        self._lock = threading.RLock()
        keys = _derive_keys(accounts)
        # Never logged or shown: DevAccount and EvmAccount print addresses only.
        self._signers: dict[bytes, PrivateKey] = {
            key.public_key.to_canonical_address(): key for key in keys
        }
        self.accounts: tuple[DevAccount, ...] = tuple(
            DevAccount(key.public_key.to_checksum_address(), EvmAccount(key.to_bytes()))
            for key in keys
        )
        genesis_state = generate_genesis_state_for_keys(
            keys, overrides={"balance": ETH_PER_ACCOUNT}
        )
        # Genesis one second back, so that the first block is stamped with the wall clock.
        genesis_params = get_default_genesis_params({"timestamp": int(time.time()) - 1})
        backend = PyEVMBackend(
            genesis_parameters=genesis_params,
            genesis_state=genesis_state,
            vm_configuration=((0, _DevVM),),
        )
        self._chain: MiningChainAPI = backend.chain
        if self._chain.chain_id != CHAIN_ID:
            raise RuntimeError("eth-tester changed its chain id")
        self._time_offset = 0
        self._exact_next_timestamp: int | None = None
        self._snapshots: dict[int, tuple[Hash32, Hash32]] = {}
        self._snapshot_ids = 0
        self._queued: dict[bytes, dict[int, SignedTransactionAPI]] = {}
        self._methods = self._method_table()
        self.asset: Asset = self.deploy_token(TOKEN_NAME, TOKEN_SYMBOL, mint=USDC_PER_ACCOUNT)
        """The token as a farebox :class:`~farebox.money.Asset` ("USD Coin", version "2", USD)."""
        if self.asset != DEVCHAIN_USDC:
            raise RuntimeError("the devchain token was not deployed at its usual address")

    # --- the public face ----------------------------------------------------------------------

    @property
    def chain_id(self) -> int:
        """The EIP-155 chain id (eth-tester's fixed 131277322940537)."""
        return CHAIN_ID

    @property
    def network(self) -> str:
        """The CAIP-2 network, ``eip155:131277322940537``."""
        return DEVCHAIN_NETWORK

    @property
    def token(self) -> str:
        """The token's checksummed address."""
        return self.asset.address

    @property
    def rpc(self) -> DevChainRpc:
        """This chain as an in-process :class:`~farebox.ledgers.rpc.Rpc` (no socket)."""
        return DevChainRpc(self)

    def now(self) -> int:
        """The timestamp the next block will have."""
        with self._lock:
            return self._next_timestamp()

    def block_number(self) -> int:
        """The number of the latest block."""
        with self._lock:
            return int(self._chain.get_canonical_head().block_number)

    def balance_of(self, address: str, token: str | None = None) -> int:
        """The token balance of ``address`` in atomic units (of the dev USDC by default)."""
        call = _BALANCE_OF_SELECTOR + abi_encode(["address"], [address])
        result = self.handle("eth_call", [{"to": token or self.token, "data": _data_out(call)}])
        return int(result, 16)

    def eth_balance(self, address: str) -> int:
        """The ETH balance of ``address`` in wei."""
        return int(self.handle("eth_getBalance", [address, "latest"]), 16)

    def deploy_token(
        self,
        name: str = TOKEN_NAME,
        symbol: str = TOKEN_SYMBOL,
        *,
        at: str | None = None,
        mint: int = 0,
    ) -> Asset:
        """Deploy another instance of the token from account 0 (its owner); its :class:`Asset`.

        ``at`` copies the deployed runtime code to that address (a canonical USDC address, say),
        whose EIP-712 domain is then its own. ``mint`` atomic units go to every dev account.
        """
        if len(name.encode()) > 64 or len(symbol.encode()) > 32:
            raise ValueError("token names are at most 64 bytes and symbols 32")
        artifact = load_token()
        with self._lock:
            owner = self.accounts[0].address
            owner_bytes = Address(address_bytes(owner))
            nonce = self._pending_state().get_nonce(owner_bytes)
            deployed = generate_contract_address(owner_bytes, nonce)
            constructor = abi_encode(["string", "string"], [name, symbol])
            self._mine_checked(
                [
                    self._sign_as(
                        owner,
                        to=b"",
                        data=artifact.bytecode + constructor,
                        nonce=nonce,
                        gas=3_000_000,
                    )
                ],
                "deploying the token",
            )
            address = deployed
            if at is not None:
                address = Address(address_bytes(at))
                code = self._pending_state().get_code(deployed)
                self._modify_state(lambda state: state.set_code(address, code))
            if mint:
                self._mine_checked(
                    [
                        self._sign_as(
                            owner,
                            to=address,
                            data=_MINT_SELECTOR
                            + abi_encode(["address", "uint256"], [holder.address, mint]),
                            nonce=nonce + 1 + index,
                        )
                        for index, holder in enumerate(self.accounts)
                    ],
                    "minting",
                )
        return Asset(
            network=DEVCHAIN_NETWORK,
            address=checksum_address(address),
            decimals=TOKEN_DECIMALS,
            symbol=symbol,
            name=name,
            version=TOKEN_VERSION,
            peg="USD",
        )

    def mint(self, to: str, amount: int, token: str | None = None) -> None:
        """Mint ``amount`` atomic units of the token (the dev USDC by default) to ``to``.

        ``token`` must be a token of :meth:`deploy_token` (account 0 is its owner).
        """
        if amount <= 0 or int(address_bytes(to).hex(), 16) == 0:
            raise ValueError("mint a positive amount to a non-zero address")
        call = _MINT_SELECTOR + abi_encode(["address", "uint256"], [to, amount])
        with self._lock:
            owner = self.accounts[0].address
            nonce = self._pending_state().get_nonce(Address(address_bytes(owner)))
            target = address_bytes(token or self.token)
            self._mine_checked(
                [self._sign_as(owner, to=target, data=call, nonce=nonce)],
                f"minting on {checksum_address(target)}",
            )

    def handle(self, method: str, params: Sequence[Any] | None = None) -> Any:
        """Answer one Ethereum JSON-RPC call: its ``result`` (JSON-ready), or raise ``RpcError``.

        Unknown methods raise code -32601 and malformed parameters -32602. A revert in
        ``eth_call``, ``eth_estimateGas`` or ``eth_sendTransaction`` (whose gas is estimated)
        raises what geth and anvil answer: code 3, ``"execution reverted: <reason>"``, the revert
        data as hex. ``eth_sendRawTransaction`` of a valid transaction that reverts does what a
        node does: it is mined with status 0 and its hash returned (its gas is in the signed
        transaction, nothing is simulated first). Invalid transactions (nonce too low, fee below
        the base fee, insufficient funds, bad signature or chain id) raise -32000 with geth's
        wording; a nonce ahead of the account's is kept until the gap fills, as a node's pool does.
        """
        if not isinstance(method, str):
            raise RpcError(-32600, "method must be a string")
        function = self._methods.get(method)
        if function is None:
            raise RpcError(-32601, f"the method {method[:64]} does not exist/is not available")
        if params is None:
            params = []
        elif not isinstance(params, list | tuple):
            raise _invalid("params must be an array")
        with self._lock:
            try:
                return function(params)
            except RpcError:
                raise
            except ValidationError as exc:
                raise _failed(str(exc)[:512]) from None
            except Exception as exc:
                # A bug here, not the caller's: keep the server answering and say what broke.
                _log.exception("devchain: %s failed", method)
                raise RpcError(-32603, f"internal error: {type(exc).__name__}") from None

    # --- blocks, time and state ---------------------------------------------------------------

    def _head(self) -> BlockHeaderAPI:
        return self._chain.get_canonical_head()

    def _next_timestamp(self) -> int:
        parent = int(self._head().timestamp)
        if self._exact_next_timestamp is not None:
            return max(self._exact_next_timestamp, parent)
        wall = int(time.time()) + self._time_offset
        if wall > parent:
            return wall
        if parent + 1 <= wall + MAX_CLOCK_LEAD:
            return parent + 1
        # Already ahead of the clock: share the parent's timestamp rather than run further ahead.
        return parent

    def _pending_header(self) -> BlockHeaderAPI:
        """The header of the block being built, dated now (its state includes cheat-code edits)."""
        header = self._chain.header
        timestamp = self._next_timestamp()
        if header.timestamp != timestamp:
            header = header.copy(timestamp=timestamp)
            self._chain.header = header
        return header

    def _pending_state(self) -> StateAPI:
        return self._chain.get_vm(self._pending_header()).state

    def _mine(self, transactions: Sequence[SignedTransactionAPI]) -> None:
        """Mine one block with ``transactions``; py-evm raises ``ValidationError`` for an invalid one."""
        self._pending_header()  # dates the block now
        self._chain.mine_all(transactions)
        self._exact_next_timestamp = None

    def _mine_checked(self, transactions: Sequence[SignedTransactionAPI], what: str) -> None:
        """Mine the chain's own transactions, which must all succeed."""
        self._mine(transactions)
        block = self._chain.get_canonical_block_by_number(self._head().block_number)
        for receipt in block.get_receipts(self._chain.chaindb):
            if receipt.state_root != b"\x01":
                raise RuntimeError(f"{what} reverted")

    def _modify_state(self, edit: Callable[[StateAPI], None]) -> None:
        """Apply a cheat-code edit to the pending state; ``latest`` reads see it at once."""
        header = self._pending_header()
        state = self._chain.get_vm(header).state
        edit(state)
        state.persist()
        self._chain.header = header.copy(state_root=state.state_root)

    def _sign_as(
        self,
        sender: str,
        *,
        to: bytes,
        data: bytes,
        nonce: int,
        gas: int = 200_000,
        value: int = 0,
    ) -> SignedTransactionAPI:
        key = self._signers[address_bytes(sender)]
        base_fee = _base_fee(self._pending_header())
        unsigned = self._builder(self._pending_header()).new_unsigned_dynamic_fee_transaction(
            chain_id=CHAIN_ID,
            nonce=nonce,
            max_priority_fee_per_gas=PRIORITY_FEE,
            max_fee_per_gas=2 * base_fee + PRIORITY_FEE,
            gas=gas,
            to=Address(to),
            value=value,
            data=data,
            access_list=(),
        )
        return cast(SignedTransactionAPI, unsigned.as_signed_transaction(key))

    def _builder(self, header: BlockHeaderAPI) -> Any:
        # py-evm types builders by their abstract base, which lacks the typed-transaction makers.
        return self._chain.get_vm(header).get_transaction_builder()

    def _resolve(self, ref: Any) -> BlockHeaderAPI | _Pending:
        """The mined header a block reference names, or ``_PENDING``; raises if there is none."""
        if ref is None or ref in ("latest", "safe", "finalized"):
            return self._head()
        if ref == "pending":
            return _PENDING
        if ref == "earliest":
            number = 0
        elif isinstance(ref, Mapping):
            if ref.get("blockHash") is not None:
                return self._header_by_hash(
                    _hash(ref["blockHash"], "blockHash"),
                    canonical=_bool(ref.get("requireCanonical"), "requireCanonical"),
                )
            number = _quantity(ref.get("blockNumber"), "blockNumber", bits=64)
        elif isinstance(ref, str) and not ref.startswith(("0x", "0X")):
            raise _invalid(f"unknown block tag {ref[:32]!r}")
        else:
            number = _quantity(ref, "block number", bits=64)
        if number > self._head().block_number:
            raise _failed("header not found")
        return self._chain.get_canonical_block_header_by_number(BlockNumber(number))

    def _header_by_hash(self, block_hash: Hash32, *, canonical: bool = True) -> BlockHeaderAPI:
        try:
            header = self._chain.get_block_header_by_hash(block_hash)
        except HeaderNotFound:
            raise _failed("header not found") from None
        if canonical and self._canonical_hash(header.block_number) != block_hash:
            raise _failed("header not found")
        return header

    def _canonical_hash(self, number: int) -> Hash32 | None:
        if number > self._head().block_number:
            return None
        try:
            return self._chain.chaindb.get_canonical_block_hash(BlockNumber(number))
        except HeaderNotFound:
            return None

    def _is_head(self, resolved: BlockHeaderAPI | _Pending) -> bool:
        return isinstance(resolved, _Pending) or resolved.hash == self._head().hash

    def _state_at(self, ref: Any) -> StateAPI:
        resolved = self._resolve(ref)
        if self._is_head(resolved):
            # The latest state includes cheat-code edits not yet mined (anvil shows them at once).
            return self._pending_state()
        return self._chain.get_vm(cast(BlockHeaderAPI, resolved)).state

    def _context_at(self, ref: Any) -> BlockHeaderAPI:
        """The header calls and estimates execute under: the next block's for ``latest``."""
        resolved = self._resolve(ref)
        if self._is_head(resolved):
            return self._pending_header()
        return cast(BlockHeaderAPI, resolved)

    # --- executing without mining -------------------------------------------------------------

    def _unsigned(
        self, request: _TxRequest, header: BlockHeaderAPI, *, nonce: int, gas: int, free: bool
    ) -> UnsignedTransactionAPI:
        builder = self._builder(header)
        if free:
            max_fee, tip = 0, 0
        elif request.gas_price is not None:
            if request.access_list is not None:
                return cast(
                    UnsignedTransactionAPI,
                    builder.new_unsigned_access_list_transaction(
                        chain_id=CHAIN_ID,
                        nonce=nonce,
                        gas_price=request.gas_price,
                        gas=gas,
                        to=request.to,
                        value=request.value,
                        data=request.data,
                        access_list=request.access_list,
                    ),
                )
            return cast(
                UnsignedTransactionAPI,
                builder.create_unsigned_transaction(
                    nonce=nonce,
                    gas_price=request.gas_price,
                    gas=gas,
                    to=request.to,
                    value=request.value,
                    data=request.data,
                ),
            )
        else:
            max_fee, tip = self._default_fees(request, header)
        return cast(
            UnsignedTransactionAPI,
            builder.new_unsigned_dynamic_fee_transaction(
                chain_id=CHAIN_ID,
                nonce=nonce,
                max_priority_fee_per_gas=tip,
                max_fee_per_gas=max_fee,
                gas=gas,
                to=request.to,
                value=request.value,
                data=request.data,
                access_list=request.access_list or (),
            ),
        )

    @staticmethod
    def _default_fees(request: _TxRequest, header: BlockHeaderAPI) -> tuple[int, int]:
        tip = PRIORITY_FEE if request.max_priority_fee is None else request.max_priority_fee
        if request.max_fee is None:
            return 2 * _base_fee(header) + tip, tip
        return request.max_fee, min(tip, request.max_fee)

    def _fee_cap(self, request: _TxRequest, header: BlockHeaderAPI) -> int:
        if not request.priced:
            return 0
        if request.gas_price is not None:
            return request.gas_price
        return self._default_fees(request, header)[0]

    def _execute(self, request: _TxRequest, header: BlockHeaderAPI, gas: int) -> ComputationAPI:
        """Run ``request`` with ``gas`` on top of ``header``'s state and throw the changes away.

        Without a fee in the request it runs at price zero under a zero base fee, as geth's
        eth_call and eth_estimateGas do, so any account (even the zero address) can call.
        """
        free = not request.priced
        context = header.copy(base_fee_per_gas=0) if free else header
        state = self._chain.get_vm(context).state
        nonce = state.get_nonce(request.sender)
        transaction = SpoofTransaction(
            self._unsigned(request, context, nonce=nonce, gas=gas, free=free),
            from_=request.sender,
        )
        balance = state.get_balance(request.sender)
        cost = request.value + gas * self._fee_cap(request, header)
        if balance < cost:
            raise _failed(
                "insufficient funds for gas * price + value: address "
                f"{checksum_address(request.sender)} have {balance} want {cost}"
            )
        snapshot = state.snapshot()
        try:
            return state.apply_transaction(cast(SignedTransactionAPI, transaction))
        finally:
            state.revert(snapshot)

    def _call(self, request: _TxRequest, header: BlockHeaderAPI) -> bytes:
        gas = request.gas if request.gas is not None else int(header.gas_limit)
        computation = self._execute(request, header, gas)
        if computation.is_error:
            raise _vm_failure(computation.error, computation.output)
        return computation.output

    def _estimate(self, request: _TxRequest, header: BlockHeaderAPI) -> int:
        """The least gas (within 1.5 %) with which ``request`` succeeds, searched as geth does."""
        cap = int(header.gas_limit) if request.gas is None else request.gas
        fee_cap = self._fee_cap(request, header)
        if fee_cap:
            state = self._chain.get_vm(header).state
            affordable = (state.get_balance(request.sender) - request.value) // fee_cap
            cap = max(0, min(cap, affordable))

        def succeeds(gas: int) -> ComputationAPI | None:
            try:
                computation = self._execute(request, header, gas)
            except (ValidationError, RpcError):
                return None  # below intrinsic gas, or unaffordable
            return None if computation.is_error else computation

        try:
            first = self._execute(request, header, cap)
        except ValidationError as exc:
            raise _failed(str(exc)[:512]) from None
        if first.is_error:
            if isinstance(first.error, OutOfGas):
                raise _failed(f"gas required exceeds allowance ({cap})")
            raise _vm_failure(first.error, first.output)
        used = cap - first.get_gas_remaining()
        refund = min(first.get_gas_refund(), used // 5)
        low = used - refund - 1  # the gas left after refunds can never suffice
        high = cap
        # Most transactions need their used gas plus refunds plus the 63/64 withheld from calls.
        optimistic = min(cap, (used + 2300) * 64 // 63)
        if optimistic < high:
            if succeeds(optimistic):
                high = optimistic
            else:
                low = optimistic
        while low + 1 < high and (high - low) * 1000 > high * 15:
            middle = (low + high) // 2
            if succeeds(middle):
                high = middle
            else:
                low = middle
        return high

    # --- sending ------------------------------------------------------------------------------

    def _submit(self, transaction: SignedTransactionAPI) -> str:
        """Check ``transaction`` as a node's pool does, then mine it (or keep it for a gap)."""
        type_id = transaction.type_id or _LEGACY_TX_TYPE
        if type_id not in (
            _LEGACY_TX_TYPE,
            _ACCESS_LIST_TX_TYPE,
            _DYNAMIC_FEE_TX_TYPE,
            _SET_CODE_TX_TYPE,
        ):
            raise _failed("transaction type not supported")
        try:
            transaction.check_signature_validity()
            sender = transaction.sender
        except Exception:
            # eth_keys and py-evm raise several kinds for a bad signature; all mean the same.
            raise _failed("invalid sender") from None
        chain_id = transaction.chain_id
        if chain_id is not None and chain_id != CHAIN_ID:
            raise _failed("invalid chain id for signer")
        header = self._pending_header()
        state = self._chain.get_vm(header).state
        expected = state.get_nonce(sender)
        address = checksum_address(sender)
        if transaction.nonce < expected:
            raise _failed(
                f"nonce too low: address {address}, tx: {transaction.nonce} state: {expected}"
            )
        if transaction.gas > header.gas_limit:
            raise _failed("exceeds block gas limit")
        if transaction.gas < transaction.intrinsic_gas:
            raise _failed(
                f"intrinsic gas too low: gas {transaction.gas}, "
                f"minimum needed {transaction.intrinsic_gas}"
            )
        if transaction.max_priority_fee_per_gas > transaction.max_fee_per_gas:
            raise _failed(
                "max priority fee per gas higher than max fee per gas: address "
                f"{address}, maxPriorityFeePerGas: {transaction.max_priority_fee_per_gas}, "
                f"maxFeePerGas: {transaction.max_fee_per_gas}"
            )
        base_fee = _base_fee(header)
        if transaction.max_fee_per_gas < base_fee:
            raise _failed(
                f"max fee per gas less than block base fee: address {address}, "
                f"maxFeePerGas: {transaction.max_fee_per_gas}, baseFee: {base_fee}"
            )
        if transaction.nonce > expected:
            return self._enqueue(sender, expected, transaction)
        balance = state.get_balance(sender)
        cost = transaction.gas * transaction.max_fee_per_gas + transaction.value
        if balance < cost:
            raise _failed(
                "insufficient funds for gas * price + value: "
                f"address {address} have {balance} want {cost}"
            )
        self._mine([transaction])
        self._drain(sender)
        return _data_out(transaction.hash)

    def _enqueue(self, sender: Address, expected: int, transaction: SignedTransactionAPI) -> str:
        queue = self._queued.setdefault(sender, {})
        old = queue.get(transaction.nonce)
        if old is not None and old.hash != transaction.hash:
            # geth's pool replaces a queued transaction only for a 10 % higher fee.
            if transaction.max_fee_per_gas * 10 < old.max_fee_per_gas * 11:
                raise _failed("replacement transaction underpriced")
        elif old is None and (
            len(queue) >= _MAX_QUEUED_PER_SENDER
            or transaction.nonce - expected > _MAX_QUEUED_PER_SENDER
            or sum(len(q) for q in self._queued.values()) >= _MAX_QUEUED
        ):
            raise _failed("txpool is full")
        queue[transaction.nonce] = transaction
        return _data_out(transaction.hash)

    def _drain(self, sender: Address) -> None:
        """Mine the kept transactions of ``sender`` whose turn has come."""
        queue = self._queued.get(sender)
        while queue:
            nonce = self._pending_state().get_nonce(sender)
            for stale in [n for n in queue if n < nonce]:
                del queue[stale]
            transaction = queue.pop(nonce, None)
            if transaction is None:
                break
            try:
                self._mine([transaction])
            except ValidationError as exc:
                # No longer valid (funds spent meanwhile): dropped, as a pool drops it.
                _log.info("devchain: dropped queued transaction: %s", exc)
        if not queue:
            self._queued.pop(sender, None)

    def _queued_transaction(self, tx_hash: bytes) -> SignedTransactionAPI | None:
        for queue in self._queued.values():
            for transaction in queue.values():
                if transaction.hash == tx_hash:
                    return transaction
        return None

    def _locate(self, tx_hash: Hash32) -> tuple[BlockAPI, int] | None:
        try:
            number, index = self._chain.chaindb.get_transaction_index(tx_hash)
        except TransactionNotFound:
            return None
        if number > self._head().block_number:
            return None
        try:
            block = self._chain.get_canonical_block_by_number(number)
        except (BlockNotFound, HeaderNotFound):
            return None
        # The lookup outlives a revert in some py-evm paths: trust it only if it still matches.
        if index >= len(block.transactions) or block.transactions[index].hash != tx_hash:
            return None
        return block, index

    # --- JSON shapes --------------------------------------------------------------------------

    def _tx_json(
        self, transaction: SignedTransactionAPI, block: BlockAPI | None, index: int | None
    ) -> dict[str, Any]:
        type_id = transaction.type_id or _LEGACY_TX_TYPE
        out: dict[str, Any] = {
            "blockHash": None if block is None else _data_out(block.hash),
            "blockNumber": None if block is None else _quantity_out(block.number),
            "from": _data_out(transaction.sender),
            "gas": _quantity_out(transaction.gas),
            "gasPrice": _quantity_out(self._effective_price(transaction, block)),
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
            out["chainId"] = _quantity_out(transaction.chain_id or CHAIN_ID)
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

    @staticmethod
    def _effective_price(transaction: SignedTransactionAPI, block: BlockAPI | None) -> int:
        if (transaction.type_id or 0) < _DYNAMIC_FEE_TX_TYPE:
            return int(transaction.max_fee_per_gas)  # the gas price, for legacy and type 1
        if block is None:
            return int(transaction.max_fee_per_gas)
        return min(
            transaction.max_fee_per_gas,
            transaction.max_priority_fee_per_gas + _base_fee(block.header),
        )

    @staticmethod
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

    def _receipt_json(
        self, block: BlockAPI, receipts: Sequence[ReceiptAPI], index: int
    ) -> dict[str, Any]:
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
            "effectiveGasPrice": _quantity_out(self._effective_price(transaction, block)),
            "from": _data_out(transaction.sender),
            "gasUsed": _quantity_out(receipt.gas_used - previous),
            "logs": [
                self._log_json(log, block, transaction, index, first_log + offset)
                for offset, log in enumerate(receipt.logs)
            ],
            "logsBloom": _data_out(int(receipt.bloom).to_bytes(256, "big")),
            "status": "0x1" if receipt.state_root == b"\x01" else "0x0",
            "to": _data_out(transaction.to) if transaction.to else None,
            "transactionHash": _data_out(transaction.hash),
            "transactionIndex": _quantity_out(index),
            "type": _quantity_out(transaction.type_id or _LEGACY_TX_TYPE),
        }

    def _block_json(self, block: BlockAPI, full: bool, *, pending: bool = False) -> dict[str, Any]:
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
                self._tx_json(transaction, None if pending else block, None if pending else i)
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

    # --- the methods --------------------------------------------------------------------------

    def _method_table(self) -> dict[str, Callable[[Sequence[Any]], Any]]:
        table: dict[str, Callable[[Sequence[Any]], Any]] = {
            "web3_clientVersion": self._client_version,
            "web3_sha3": lambda p: _data_out(keccak256(_data(_param(p, 0, "data"), "data"))),
            "net_version": lambda _p: str(CHAIN_ID),
            "net_listening": lambda _p: True,
            "net_peerCount": lambda _p: "0x0",
            "eth_chainId": lambda _p: _quantity_out(CHAIN_ID),
            "eth_syncing": lambda _p: False,
            "eth_mining": lambda _p: False,
            "eth_hashrate": lambda _p: "0x0",
            "eth_blockNumber": lambda _p: _quantity_out(self._head().block_number),
            "eth_accounts": lambda _p: [account.address.lower() for account in self.accounts],
            "eth_getBalance": self._get_balance,
            "eth_getTransactionCount": self._get_transaction_count,
            "eth_getCode": self._get_code,
            "eth_getStorageAt": self._get_storage_at,
            "eth_gasPrice": lambda _p: _quantity_out(
                _base_fee(self._pending_header()) + PRIORITY_FEE
            ),
            "eth_maxPriorityFeePerGas": lambda _p: _quantity_out(PRIORITY_FEE),
            "eth_blobBaseFee": lambda _p: "0x1",
            "eth_feeHistory": self._fee_history,
            "eth_call": self._eth_call,
            "eth_estimateGas": self._estimate_gas,
            "eth_sendRawTransaction": self._send_raw_transaction,
            "eth_sendTransaction": self._send_transaction,
            "eth_getTransactionByHash": self._get_transaction_by_hash,
            "eth_getTransactionReceipt": self._get_transaction_receipt,
            "eth_getBlockByNumber": self._get_block_by_number,
            "eth_getBlockByHash": self._get_block_by_hash,
            "eth_getBlockReceipts": self._get_block_receipts,
            "eth_getBlockTransactionCountByNumber": self._count_by_number,
            "eth_getBlockTransactionCountByHash": self._count_by_hash,
            "eth_getTransactionByBlockNumberAndIndex": self._tx_by_number_and_index,
            "eth_getTransactionByBlockHashAndIndex": self._tx_by_hash_and_index,
            "eth_getUncleCountByBlockNumber": lambda _p: "0x0",
            "eth_getUncleCountByBlockHash": lambda _p: "0x0",
            "eth_getLogs": self._get_logs,
            "evm_mine": self._evm_mine,
            "anvil_mine": self._anvil_mine,
            "evm_snapshot": self._evm_snapshot,
            "evm_revert": self._evm_revert,
            "evm_increaseTime": self._evm_increase_time,
            "evm_setNextBlockTimestamp": self._evm_set_next_block_timestamp,
            "anvil_setCode": self._set_code,
            "anvil_setBalance": self._set_balance,
            "anvil_setNonce": self._set_nonce,
            "anvil_setStorageAt": self._set_storage_at,
        }
        for name in ("setCode", "setBalance", "setNonce", "setStorageAt", "mine"):
            table[f"hardhat_{name}"] = table[f"anvil_{name}"]
        table["anvil_snapshot"] = table["evm_snapshot"]
        table["anvil_revert"] = table["evm_revert"]
        table["anvil_increaseTime"] = table["evm_increaseTime"]
        table["anvil_setNextBlockTimestamp"] = table["evm_setNextBlockTimestamp"]
        return table

    def _client_version(self, _params: Sequence[Any]) -> str:
        from farebox import __version__

        return f"farebox-devchain/v{__version__}/py-evm"

    def _get_balance(self, params: Sequence[Any]) -> str:
        address = _address(_param(params, 0, "address"), "address")
        state = self._state_at(_param(params, 1, "block", required=False))
        return _quantity_out(state.get_balance(address))

    def _get_transaction_count(self, params: Sequence[Any]) -> str:
        address = _address(_param(params, 0, "address"), "address")
        state = self._state_at(_param(params, 1, "block", required=False))
        return _quantity_out(state.get_nonce(address))

    def _get_code(self, params: Sequence[Any]) -> str:
        address = _address(_param(params, 0, "address"), "address")
        state = self._state_at(_param(params, 1, "block", required=False))
        return _data_out(state.get_code(address))

    def _get_storage_at(self, params: Sequence[Any]) -> str:
        address = _address(_param(params, 0, "address"), "address")
        slot = _quantity(_param(params, 1, "slot"), "slot")
        state = self._state_at(_param(params, 2, "block", required=False))
        return _word_out(state.get_storage(address, slot))

    def _fee_history(self, params: Sequence[Any]) -> dict[str, Any]:
        count = _quantity(_param(params, 0, "blockCount"), "blockCount", bits=64)
        resolved = self._resolve(_param(params, 1, "newestBlock"))
        newest = self._head() if isinstance(resolved, _Pending) else resolved
        percentiles = _param(params, 2, "rewardPercentiles", required=False)
        if percentiles is not None and (
            not isinstance(percentiles, list)
            or len(percentiles) > 100
            or not all(
                isinstance(p, int | float) and not isinstance(p, bool) and 0 <= p <= 100
                for p in percentiles
            )
            or percentiles != sorted(percentiles)
        ):
            raise _invalid("rewardPercentiles: expected ascending numbers between 0 and 100")
        count = min(count, _MAX_FEE_HISTORY_BLOCKS, newest.block_number + 1)
        oldest = newest.block_number - count + 1 if count else newest.block_number
        base_fees: list[str] = []
        ratios: list[float] = []
        rewards: list[list[str]] = []
        for number in range(oldest, oldest + count):
            header = self._chain.get_canonical_block_header_by_number(BlockNumber(number))
            base_fees.append(_quantity_out(_base_fee(header)))
            ratios.append(header.gas_used / header.gas_limit)
            if percentiles is not None:
                rewards.append(self._rewards(header, percentiles))
        if count:
            following = (
                self._pending_header()
                if newest.hash == self._head().hash
                else self._chain.get_canonical_block_header_by_number(
                    BlockNumber(newest.block_number + 1)
                )
            )
            base_fees.append(_quantity_out(_base_fee(following)))
        out: dict[str, Any] = {
            "oldestBlock": _quantity_out(oldest),
            "baseFeePerGas": base_fees,
            "gasUsedRatio": ratios,
            "baseFeePerBlobGas": ["0x1"] * len(base_fees),
            "blobGasUsedRatio": [0.0] * len(ratios),
        }
        if percentiles is not None:
            out["reward"] = rewards
        return out

    def _rewards(self, header: BlockHeaderAPI, percentiles: list[float]) -> list[str]:
        """The tips paid in a block at each gas-weighted percentile, as geth computes them."""
        if not header.gas_used:
            return ["0x0"] * len(percentiles)
        block = self._chain.get_block_by_header(header)
        receipts = block.get_receipts(self._chain.chaindb)
        base_fee = _base_fee(header)
        paid: list[tuple[int, int]] = []
        previous = 0
        for transaction, receipt in zip(block.transactions, receipts, strict=True):
            tip = min(transaction.max_priority_fee_per_gas, transaction.max_fee_per_gas - base_fee)
            paid.append((tip, receipt.gas_used - previous))
            previous = receipt.gas_used
        paid.sort()
        out = []
        for percentile in percentiles:
            threshold = header.gas_used * percentile / 100
            total, chosen = 0, paid[-1][0]
            for tip, gas in paid:
                total += gas
                if total >= threshold:
                    chosen = tip
                    break
            out.append(_quantity_out(chosen))
        return out

    def _eth_call(self, params: Sequence[Any]) -> str:
        request = _tx_request(_param(params, 0, "transaction"))
        header = self._context_at(_param(params, 1, "block", required=False))
        if _param(params, 2, "stateOverrides", required=False) is not None:
            raise _invalid("state overrides are not supported by the devchain")
        return _data_out(self._call(request, header))

    def _estimate_gas(self, params: Sequence[Any]) -> str:
        request = _tx_request(_param(params, 0, "transaction"))
        header = self._context_at(_param(params, 1, "block", required=False))
        return _quantity_out(self._estimate(request, header))

    def _send_raw_transaction(self, params: Sequence[Any]) -> str:
        raw = _data(_param(params, 0, "transaction"), "transaction", max_bytes=_MAX_DATA_BYTES)
        if not raw:
            raise _invalid("empty raw transaction")
        if raw[0] == _BLOB_TX_TYPE:
            raise _failed("blob transactions (type 3) are not supported by the devchain")
        builder = self._chain.get_vm(self._pending_header()).get_transaction_builder()
        try:
            transaction = builder.decode(raw)
        except Exception:
            # rlp and py-evm raise many kinds for undecodable bytes; all mean "not a transaction".
            raise _invalid("invalid raw transaction: cannot decode it") from None
        return self._submit(transaction)

    def _send_transaction(self, params: Sequence[Any]) -> str:
        request = _tx_request(_param(params, 0, "transaction"))
        key = self._signers.get(request.sender)
        if key is None:
            raise _failed("unknown account: only the devchain's own accounts can sign")
        header = self._pending_header()
        nonce = request.nonce
        if nonce is None:
            nonce = self._chain.get_vm(header).state.get_nonce(request.sender)
        gas = request.gas if request.gas is not None else self._estimate(request, header)
        unsigned = self._unsigned(request, header, nonce=nonce, gas=gas, free=False)
        # chain_id makes a legacy transaction EIP-155; typed ones carry theirs already.
        return self._submit(unsigned.as_signed_transaction(key, chain_id=CHAIN_ID))

    def _get_transaction_by_hash(self, params: Sequence[Any]) -> dict[str, Any] | None:
        tx_hash = _hash(_param(params, 0, "hash"), "hash")
        located = self._locate(tx_hash)
        if located is None:
            queued = self._queued_transaction(tx_hash)
            return None if queued is None else self._tx_json(queued, None, None)
        block, index = located
        return self._tx_json(block.transactions[index], block, index)

    def _get_transaction_receipt(self, params: Sequence[Any]) -> dict[str, Any] | None:
        located = self._locate(_hash(_param(params, 0, "hash"), "hash"))
        if located is None:
            return None
        block, index = located
        return self._receipt_json(block, block.get_receipts(self._chain.chaindb), index)

    def _block_at(self, ref: Any) -> tuple[BlockAPI, bool] | None:
        try:
            resolved = self._resolve(ref)
        except RpcError as exc:
            if exc.code == -32000:  # no such block: JSON null, as a node answers
                return None
            raise
        if isinstance(resolved, _Pending):
            return self._chain.get_vm(self._pending_header()).get_block(), True
        return self._chain.get_block_by_header(resolved), False

    def _get_block_by_number(self, params: Sequence[Any]) -> dict[str, Any] | None:
        ref = _param(params, 0, "block")
        full = _bool(_param(params, 1, "fullTransactions", required=False), "fullTransactions")
        found = self._block_at(ref)
        if found is None:
            return None
        return self._block_json(found[0], full, pending=found[1])

    def _get_block_by_hash(self, params: Sequence[Any]) -> dict[str, Any] | None:
        block_hash = _hash(_param(params, 0, "hash"), "hash")
        full = _bool(_param(params, 1, "fullTransactions", required=False), "fullTransactions")
        found = self._block_at({"blockHash": _data_out(block_hash)})
        return None if found is None else self._block_json(found[0], full)

    def _get_block_receipts(self, params: Sequence[Any]) -> list[dict[str, Any]] | None:
        found = self._block_at(_param(params, 0, "block"))
        if found is None or found[1]:
            return None
        block = found[0]
        receipts = block.get_receipts(self._chain.chaindb)
        return [self._receipt_json(block, receipts, i) for i in range(len(receipts))]

    def _count_by_number(self, params: Sequence[Any]) -> str | None:
        found = self._block_at(_param(params, 0, "block"))
        return None if found is None else _quantity_out(len(found[0].transactions))

    def _count_by_hash(self, params: Sequence[Any]) -> str | None:
        block_hash = _hash(_param(params, 0, "hash"), "hash")
        found = self._block_at({"blockHash": _data_out(block_hash)})
        return None if found is None else _quantity_out(len(found[0].transactions))

    def _tx_by_number_and_index(self, params: Sequence[Any]) -> dict[str, Any] | None:
        found = self._block_at(_param(params, 0, "block"))
        return self._tx_in(found, _quantity(_param(params, 1, "index"), "index", bits=64))

    def _tx_by_hash_and_index(self, params: Sequence[Any]) -> dict[str, Any] | None:
        block_hash = _hash(_param(params, 0, "hash"), "hash")
        found = self._block_at({"blockHash": _data_out(block_hash)})
        return self._tx_in(found, _quantity(_param(params, 1, "index"), "index", bits=64))

    def _tx_in(self, found: tuple[BlockAPI, bool] | None, index: int) -> dict[str, Any] | None:
        if found is None or index >= len(found[0].transactions):
            return None
        block, pending = found
        return self._tx_json(
            block.transactions[index], None if pending else block, None if pending else index
        )

    def _get_logs(self, params: Sequence[Any]) -> list[dict[str, Any]]:
        query = _param(params, 0, "filter")
        if not isinstance(query, Mapping):
            raise _invalid("filter: expected an object")
        addresses = query.get("address")
        if addresses is None:
            wanted_addresses: frozenset[bytes] | None = None
        elif isinstance(addresses, list):
            wanted_addresses = frozenset(_address(a, "address") for a in addresses[:1024])
        else:
            wanted_addresses = frozenset({_address(addresses, "address")})
        topics = query.get("topics") or []
        if not isinstance(topics, list) or len(topics) > 4:
            raise _invalid("topics: expected a list of at most 4 positions")
        wanted_topics: list[frozenset[int] | None] = []
        for position in topics:
            if position is None:
                wanted_topics.append(None)
                continue
            options = position if isinstance(position, list) else [position]
            if any(option is None for option in options):
                wanted_topics.append(None)
                continue
            wanted_topics.append(
                frozenset(int.from_bytes(_hash(t, "topic"), "big") for t in options[:1024])
            )
        if query.get("blockHash") is not None:
            if query.get("fromBlock") is not None or query.get("toBlock") is not None:
                raise _invalid("cannot specify both blockHash and fromBlock/toBlock")
            headers: Sequence[BlockHeaderAPI] = [
                self._header_by_hash(_hash(query["blockHash"], "blockHash"))
            ]
        else:
            first = self._log_bound(query.get("fromBlock"))
            last = self._log_bound(query.get("toBlock"))
            if first > last:
                raise _invalid("invalid block range params")
            headers = _HeaderRange(self._chain, first, last)

        def matches(log: LogAPI) -> bool:
            if wanted_addresses is not None and log.address not in wanted_addresses:
                return False
            for position, wanted in enumerate(wanted_topics):
                if wanted is None:
                    continue
                if position >= len(log.topics) or log.topics[position] not in wanted:
                    return False
            return True

        results: list[dict[str, Any]] = []
        for header in headers:
            if header.transaction_root == BLANK_ROOT_HASH or not _bloom_may_match(
                header, wanted_addresses, wanted_topics
            ):
                continue
            block = self._chain.get_block_by_header(header)
            log_index = 0
            for index, receipt in enumerate(block.get_receipts(self._chain.chaindb)):
                for log in receipt.logs:
                    if matches(log):
                        results.append(
                            self._log_json(log, block, block.transactions[index], index, log_index)
                        )
                    log_index += 1
        return results

    def _log_bound(self, ref: Any) -> int:
        head = int(self._head().block_number)
        if ref is None or ref in ("latest", "safe", "finalized", "pending"):
            return head
        if ref == "earliest":
            return 0
        return min(_quantity(ref, "block number", bits=64), head)

    # --- development methods (anvil / hardhat) ------------------------------------------------

    def _evm_mine(self, params: Sequence[Any]) -> str:
        timestamp = _param(params, 0, "timestamp", required=False)
        if isinstance(timestamp, Mapping):  # hardhat/ganache options form
            timestamp = timestamp.get("timestamp")
        if timestamp is not None:
            self._set_next_timestamp(_quantity(timestamp, "timestamp", bits=64))
        self._mine([])
        return "0x0"

    def _anvil_mine(self, params: Sequence[Any]) -> None:
        raw_count = _param(params, 0, "blocks", required=False)
        count = 1 if raw_count is None else _quantity(raw_count, "blocks", bits=64)
        raw_interval = _param(params, 1, "interval", required=False)
        interval = None if raw_interval is None else _quantity(raw_interval, "interval", bits=32)
        if count > _MAX_MINE_BLOCKS:
            raise _invalid(f"blocks: at most {_MAX_MINE_BLOCKS} at once")
        for _ in range(count):
            if interval is not None:
                self._set_next_timestamp(int(self._head().timestamp) + interval)
            self._mine([])

    def _set_next_timestamp(self, timestamp: int) -> None:
        parent = int(self._head().timestamp)
        if timestamp < parent:
            raise _invalid(f"timestamp {timestamp} is before the latest block's ({parent})")
        self._exact_next_timestamp = timestamp
        # Time then goes on from there, as anvil does.
        self._time_offset = timestamp - int(time.time())

    def _evm_set_next_block_timestamp(self, params: Sequence[Any]) -> None:
        self._set_next_timestamp(_quantity(_param(params, 0, "timestamp"), "timestamp", bits=64))

    def _evm_increase_time(self, params: Sequence[Any]) -> int:
        seconds = _quantity(_param(params, 0, "seconds"), "seconds", bits=48)
        self._time_offset += seconds
        return self._time_offset

    def _evm_snapshot(self, _params: Sequence[Any]) -> str:
        if len(self._snapshots) >= _MAX_SNAPSHOTS:
            raise _failed("too many snapshots")
        self._snapshot_ids += 1
        self._snapshots[self._snapshot_ids] = (self._head().hash, self._chain.header.state_root)
        return _quantity_out(self._snapshot_ids)

    def _evm_revert(self, params: Sequence[Any]) -> bool:
        snapshot_id = _quantity(_param(params, 0, "snapshot"), "snapshot", bits=64)
        saved = self._snapshots.get(snapshot_id)
        if saved is None:
            return False
        # As anvil: reverting consumes this snapshot and every later one.
        for later in [i for i in self._snapshots if i >= snapshot_id]:
            del self._snapshots[later]
        head_hash, pending_root = saved
        self._rewind(self._chain.get_block_header_by_hash(head_hash))
        self._chain.header = self._chain.header.copy(state_root=pending_root)
        self._queued.clear()
        self._exact_next_timestamp = None
        return True

    def _rewind(self, header: BlockHeaderAPI) -> None:
        """Make ``header`` the head again, forgetting the blocks mined after it."""
        chaindb = self._chain.chaindb
        dropped = [
            self._chain.get_canonical_block_by_number(BlockNumber(number))
            for number in range(header.block_number + 1, self._head().block_number + 1)
        ]
        # The rewind of eth-tester's revert_to_snapshot, without its re-import of the head block
        # (which fails after a cheat-code edit: that state root has no transactions behind it).
        cast(Any, chaindb)._set_as_canonical_chain_head(chaindb.db, header, GENESIS_PARENT_HASH)
        # py-evm leaves the later blocks' transaction lookups behind: drop them. Their number
        # lookups stay (py-evm's gap bookkeeping reads them); reads above the head ignore them.
        for block in dropped:
            for transaction in block.transactions:
                chaindb.db.delete(
                    SchemaV1.make_transaction_hash_to_block_lookup_key(transaction.hash)
                )
        self._chain.header = self._chain.create_header_from_parent(header)

    def _set_code(self, params: Sequence[Any]) -> None:
        address = _address(_param(params, 0, "address"), "address")
        code = _data(_param(params, 1, "code"), "code", max_bytes=0xC000)
        self._modify_state(lambda state: state.set_code(address, code))

    def _set_balance(self, params: Sequence[Any]) -> None:
        address = _address(_param(params, 0, "address"), "address")
        balance = _quantity(_param(params, 1, "balance"), "balance")
        self._modify_state(lambda state: state.set_balance(address, balance))

    def _set_nonce(self, params: Sequence[Any]) -> None:
        address = _address(_param(params, 0, "address"), "address")
        nonce = _quantity(_param(params, 1, "nonce"), "nonce", bits=64)
        self._modify_state(lambda state: state.set_nonce(address, nonce))

    def _set_storage_at(self, params: Sequence[Any]) -> bool:
        address = _address(_param(params, 0, "address"), "address")
        slot = _quantity(_param(params, 1, "slot"), "slot")
        value = int.from_bytes(_hash(_param(params, 2, "value"), "value"), "big")
        self._modify_state(lambda state: state.set_storage(address, slot, value))
        return True


class _HeaderRange(Sequence[BlockHeaderAPI]):
    """Canonical headers ``first..last``, read lazily (a log query may span many blocks)."""

    def __init__(self, chain: MiningChainAPI, first: int, last: int) -> None:
        self._chain = chain
        self._first = first
        self._last = last

    def __len__(self) -> int:
        return self._last - self._first + 1

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            raise TypeError("slices are not supported")
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._chain.get_canonical_block_header_by_number(BlockNumber(self._first + index))


def _bloom_may_match(
    header: BlockHeaderAPI,
    addresses: frozenset[bytes] | None,
    topics: Sequence[frozenset[int] | None],
) -> bool:
    bloom = BloomFilter(int(header.bloom))
    if addresses is not None and not any(address in bloom for address in addresses):
        return False
    for wanted in topics:
        if wanted is not None and not any(t.to_bytes(32, "big") in bloom for t in wanted):
            return False
    return True


class DevChainRpc:
    """A :class:`DevChain` as an :class:`~farebox.ledgers.rpc.Rpc`, in-process.

    Each request runs :meth:`DevChain.handle` in a worker thread (EVM execution takes
    milliseconds and must not block the event loop); answers and errors are exactly those of
    ``farebox devchain`` over HTTP.
    """

    def __init__(self, chain: DevChain) -> None:
        self.chain = chain

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        """Call ``method``; the ``result``, or raise :class:`~farebox.ledgers.rpc.RpcError`."""
        return await anyio.to_thread.run_sync(self.chain.handle, method, list(params))
