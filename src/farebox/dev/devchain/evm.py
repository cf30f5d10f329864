"""The devchain's EVM: py-evm under one lock, its accounts, its blocks and clock, and what executing
and sending a transaction does (see :mod:`farebox.dev.devchain` for the clock's rules).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, cast

from eth.abc import (
    BlockHeaderAPI,
    ComputationAPI,
    MiningChainAPI,
    SignedTransactionAPI,
    StateAPI,
    UnsignedTransactionAPI,
)
from eth.exceptions import HeaderNotFound, OutOfGas
from eth.vm.forks.prague import PragueVM
from eth.vm.spoof import SpoofTransaction
from eth_keys.datatypes import PrivateKey
from eth_tester.backends.pyevm.main import (  # type: ignore[import-untyped]
    PyEVMBackend,
    generate_genesis_state_for_keys,
    get_account_keys_from_mnemonic,
    get_default_genesis_params,
)
from eth_typing import Address, BlockNumber, Hash32
from eth_utils.exceptions import ValidationError

from farebox.dev.devchain.json import (
    _ACCESS_LIST_TX_TYPE,
    _DYNAMIC_FEE_TX_TYPE,
    _LEGACY_TX_TYPE,
    _PENDING,
    _SET_CODE_TX_TYPE,
    _base_fee,
    _bool,
    _data_out,
    _failed,
    _hash,
    _invalid,
    _Pending,
    _quantity,
    _TxRequest,
    _vm_failure,
)
from farebox.eth import EvmAccount, address_bytes, checksum_address
from farebox.ledgers.rpc import RpcError
from farebox.money import DEVCHAIN_USDC

_log = logging.getLogger("farebox.dev.devchain")

MNEMONIC: Final = "test test test test test test test test test test test junk"
HD_PATH: Final = "m/44'/60'/0'/0"
# eth-tester's fixed chain id (py-evm's MainnetTesterPosChain), and where every DevChain deploys
# its token: account 0's first contract (the address anvil and hardhat give it too). Both are in
# farebox.money.DEVCHAIN_USDC, so another process knows the token of a `farebox devchain`.
CHAIN_ID: Final = DEVCHAIN_USDC.chain_id
DEVCHAIN_NETWORK: Final = DEVCHAIN_USDC.network
DEVCHAIN_TOKEN: Final = DEVCHAIN_USDC.address
ETH_PER_ACCOUNT: Final = 10_000 * 10**18
# The tip eth_maxPriorityFeePerGas suggests and eth_sendTransaction uses by default (anvil's).
PRIORITY_FEE: Final = 10**9
# How far a block's timestamp may run ahead of the wall clock before blocks share a timestamp.
MAX_CLOCK_LEAD: Final = 1
# Bounds on what senders can keep waiting for a nonce gap to fill.
_MAX_QUEUED_PER_SENDER: Final = 64
_MAX_QUEUED: Final = 1024


class _DevVM(PragueVM):
    """Prague, except that a block may share its parent's timestamp (see the package docstring)."""

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


class _Evm:
    """The chain itself: accounts, blocks and their clock, state, executing and sending.

    ``_lock`` serializes every access to the chain (py-evm is not thread-safe): the public methods
    of :class:`~farebox.dev.devchain.DevChain` take it, the private ones expect it held.
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
