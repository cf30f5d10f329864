"""The devchain's token: farebox's USDC look-alike (:mod:`farebox.dev.contracts`), deployed by
account 0 on every chain. Its names and decimals, what each development account is minted, and
the calls the chain makes to it (constructor, mint, balanceOf).
"""

from __future__ import annotations

from typing import Final

from eth_abi.abi import encode as abi_encode

from farebox.eth import checksum_address, keccak256
from farebox.money import DEVCHAIN_USDC, Asset

__all__ = [
    "TOKEN_DECIMALS",
    "TOKEN_NAME",
    "TOKEN_SYMBOL",
    "TOKEN_VERSION",
    "USDC_PER_ACCOUNT",
    "balance_of_call",
    "constructor_arguments",
    "mint_call",
    "token_asset",
]

USDC_PER_ACCOUNT: Final = 1_000 * 10**6
TOKEN_NAME: Final = "USD Coin"  # noqa: S105 - a token name, not a secret
TOKEN_SYMBOL: Final = "USDC"  # noqa: S105
TOKEN_VERSION: Final = "2"  # noqa: S105
TOKEN_DECIMALS: Final = 6

_MINT_SELECTOR: Final = keccak256(b"mint(address,uint256)")[:4]
_BALANCE_OF_SELECTOR: Final = keccak256(b"balanceOf(address)")[:4]


def constructor_arguments(name: str, symbol: str) -> bytes:
    """What follows the creation code: the ABI-encoded ``(string name, string symbol)``."""
    return abi_encode(["string", "string"], [name, symbol])


def mint_call(to: str, amount: int) -> bytes:
    """Calldata of ``mint(to, amount)`` (the owner's call)."""
    return _MINT_SELECTOR + abi_encode(["address", "uint256"], [to, amount])


def balance_of_call(address: str) -> bytes:
    """Calldata of ``balanceOf(address)``."""
    return _BALANCE_OF_SELECTOR + abi_encode(["address"], [address])


def token_asset(address: bytes, name: str, symbol: str) -> Asset:
    """A token deployed on the devchain at ``address``, as a farebox :class:`~farebox.money.Asset`."""
    return Asset(
        network=DEVCHAIN_USDC.network,
        address=checksum_address(address),
        decimals=TOKEN_DECIMALS,
        symbol=symbol,
        name=name,
        version=TOKEN_VERSION,
        peg="USD",
    )
