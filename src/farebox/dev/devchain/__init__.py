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

The package: :mod:`~farebox.dev.devchain.chain` (:class:`DevChain`, the token deployed, its public
face), :mod:`~farebox.dev.devchain.rpc` (:meth:`DevChain.handle` and the standard methods),
:mod:`~farebox.dev.devchain.cheats` (the anvil and hardhat methods), :mod:`~farebox.dev.devchain.evm`
(py-evm, the clock, executing and sending), :mod:`~farebox.dev.devchain.json` (JSON-RPC values and
shapes) and :mod:`~farebox.dev.devchain.token` (the token's names and calls).
"""

from farebox.dev.devchain.chain import DevChain
from farebox.dev.devchain.evm import (
    CHAIN_ID,
    DEVCHAIN_NETWORK,
    DEVCHAIN_TOKEN,
    ETH_PER_ACCOUNT,
    MNEMONIC,
    DevAccount,
)
from farebox.dev.devchain.json import revert_error
from farebox.dev.devchain.rpc import DevChainRpc
from farebox.dev.devchain.token import USDC_PER_ACCOUNT

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
