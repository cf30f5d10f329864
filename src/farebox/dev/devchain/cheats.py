"""The devchain's development methods, as anvil and hardhat name them (``evm_*``, ``anvil_*``,
``hardhat_*``): mine, move the clock, snapshot and revert, set code, balances, nonces and storage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

from eth.abc import BlockHeaderAPI
from eth.constants import GENESIS_PARENT_HASH
from eth.db.schema import SchemaV1
from eth_typing import BlockNumber

from farebox.dev.devchain.evm import _Evm
from farebox.dev.devchain.json import (
    _address,
    _data,
    _failed,
    _hash,
    _invalid,
    _param,
    _quantity,
    _quantity_out,
)

# Bounds on what one request can make the chain do.
_MAX_MINE_BLOCKS: Final = 10_000
_MAX_SNAPSHOTS: Final = 10_000


class _Cheats(_Evm):
    """The development methods of the JSON-RPC table (see :mod:`farebox.dev.devchain.rpc`)."""

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
