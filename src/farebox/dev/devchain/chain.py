"""The devchain: :class:`DevChain`, an EVM in this process with the dev USDC deployed on it.

It is assembled from its parts: the EVM (:mod:`~farebox.dev.devchain.evm`), the development
methods (:mod:`~farebox.dev.devchain.cheats`) and the JSON-RPC answers
(:mod:`~farebox.dev.devchain.rpc`); here the token is deployed and the chain gets its public face.
"""

from __future__ import annotations

from eth._utils.address import generate_contract_address
from eth_typing import Address

from farebox.dev.contracts import load_token
from farebox.dev.devchain.evm import CHAIN_ID, DEVCHAIN_NETWORK
from farebox.dev.devchain.json import _data_out
from farebox.dev.devchain.rpc import DevChainRpc, _JsonRpc
from farebox.dev.devchain.token import (
    TOKEN_NAME,
    TOKEN_SYMBOL,
    USDC_PER_ACCOUNT,
    balance_of_call,
    constructor_arguments,
    mint_call,
    token_asset,
)
from farebox.eth import address_bytes, checksum_address
from farebox.money import DEVCHAIN_USDC, Asset

__all__ = ["DevChain"]


class DevChain(_JsonRpc):
    """An in-process EVM development chain with a USDC-like token and ten funded accounts.

    Thread-safe: one lock serializes every access to the chain (py-evm is not thread-safe), so
    one chain can serve a whole test session, many threads and the HTTP server at once.
    """

    def __init__(self, *, accounts: int = 10) -> None:
        super().__init__(accounts=accounts)
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
        call = balance_of_call(address)
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
            constructor = constructor_arguments(name, symbol)
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
                            data=mint_call(holder.address, mint),
                            nonce=nonce + 1 + index,
                        )
                        for index, holder in enumerate(self.accounts)
                    ],
                    "minting",
                )
        return token_asset(address, name, symbol)

    def mint(self, to: str, amount: int, token: str | None = None) -> None:
        """Mint ``amount`` atomic units of the token (the dev USDC by default) to ``to``.

        ``token`` must be a token of :meth:`deploy_token` (account 0 is its owner).
        """
        if amount <= 0 or int(address_bytes(to).hex(), 16) == 0:
            raise ValueError("mint a positive amount to a non-zero address")
        call = mint_call(to, amount)
        with self._lock:
            owner = self.accounts[0].address
            nonce = self._pending_state().get_nonce(Address(address_bytes(owner)))
            target = address_bytes(token or self.token)
            self._mine_checked(
                [self._sign_as(owner, to=target, data=call, nonce=nonce)],
                f"minting on {checksum_address(target)}",
            )
