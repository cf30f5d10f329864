"""The devchain's Ethereum JSON-RPC: :meth:`DevChain.handle <farebox.dev.devchain.DevChain.handle>`,
the table of methods it answers and the standard ones (``eth_*``, ``net_*``, ``web3_*``), and
:class:`DevChainRpc`, the chain as an in-process :class:`~farebox.ledgers.rpc.Rpc`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio.to_thread
from eth.abc import BlockAPI, BlockHeaderAPI, LogAPI, MiningChainAPI, SignedTransactionAPI
from eth.constants import BLANK_ROOT_HASH
from eth.exceptions import BlockNotFound, HeaderNotFound, TransactionNotFound
from eth_bloom.bloom import BloomFilter
from eth_typing import BlockNumber, Hash32
from eth_utils.exceptions import ValidationError

from farebox.dev.devchain.cheats import _Cheats
from farebox.dev.devchain.evm import CHAIN_ID, PRIORITY_FEE
from farebox.dev.devchain.json import (
    _BLOB_TX_TYPE,
    _MAX_DATA_BYTES,
    _address,
    _base_fee,
    _block_json,
    _bool,
    _data,
    _data_out,
    _failed,
    _hash,
    _invalid,
    _log_json,
    _param,
    _Pending,
    _quantity,
    _quantity_out,
    _receipt_json,
    _tx_json,
    _tx_request,
    _word_out,
)
from farebox.eth import keccak256
from farebox.ledgers.rpc import RpcError

if TYPE_CHECKING:
    from farebox.dev.devchain.chain import DevChain

__all__ = ["DevChainRpc"]

_log = logging.getLogger("farebox.dev.devchain")

# The most blocks one eth_feeHistory reports (a bound on what one request can make the chain do).
_MAX_FEE_HISTORY_BLOCKS: Final = 1024


class _JsonRpc(_Cheats):
    """The chain's JSON-RPC answers: :meth:`handle` and the methods of its table."""

    def __init__(self, *, accounts: int) -> None:
        super().__init__(accounts=accounts)
        self._methods = self._method_table()

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

    # --- finding transactions -----------------------------------------------------------------

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
            return None if queued is None else _tx_json(queued, None, None)
        block, index = located
        return _tx_json(block.transactions[index], block, index)

    def _get_transaction_receipt(self, params: Sequence[Any]) -> dict[str, Any] | None:
        located = self._locate(_hash(_param(params, 0, "hash"), "hash"))
        if located is None:
            return None
        block, index = located
        return _receipt_json(block, block.get_receipts(self._chain.chaindb), index)

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
        return _block_json(found[0], full, pending=found[1])

    def _get_block_by_hash(self, params: Sequence[Any]) -> dict[str, Any] | None:
        block_hash = _hash(_param(params, 0, "hash"), "hash")
        full = _bool(_param(params, 1, "fullTransactions", required=False), "fullTransactions")
        found = self._block_at({"blockHash": _data_out(block_hash)})
        return None if found is None else _block_json(found[0], full)

    def _get_block_receipts(self, params: Sequence[Any]) -> list[dict[str, Any]] | None:
        found = self._block_at(_param(params, 0, "block"))
        if found is None or found[1]:
            return None
        block = found[0]
        receipts = block.get_receipts(self._chain.chaindb)
        return [_receipt_json(block, receipts, i) for i in range(len(receipts))]

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
        return _tx_json(
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
                            _log_json(log, block, block.transactions[index], index, log_index)
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
