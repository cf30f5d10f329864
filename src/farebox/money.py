"""Assets and amounts: exact integers of atomic units, never floats.

An :class:`Asset` is a token on a network (CAIP-2) with its decimals and the EIP-712 domain its
``transferWithAuthorization`` signatures use. Prices are written for people (``"$0.01"``,
``"0.01 USDC"``, ``Decimal("0.01")``) or as atomic ints, and become ints here. A price finer than the
asset's decimals is an error, never rounded: an API that means 0.0000001 USDC should hear so.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from farebox.errors import ConfigError
from farebox.eth import UINT256_MAX, checked_address

__all__ = [
    "ASSETS",
    "BASE_SEPOLIA_USDC",
    "BASE_USDC",
    "DEVCHAIN_USDC",
    "Asset",
    "AssetRegistry",
    "Price",
    "format_amount",
    "parse_price",
]

Price = int | str | Decimal


@dataclass(frozen=True, slots=True)
class Asset:
    """A token on one network.

    ``name`` and ``version`` are the token's EIP-712 domain; ``peg`` is the fiat currency a
    stablecoin tracks (so ``"$0.01"`` can be priced in it), or ``None``. ``address`` is all-lower
    or all-upper case hex, or carries its exact EIP-55 checksum (see
    :func:`~farebox.eth.checked_address`).
    """

    network: str
    address: str
    decimals: int
    symbol: str
    name: str
    version: str
    peg: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.decimals <= 36:
            raise ConfigError("asset decimals must be between 0 and 36")
        if not re.fullmatch(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}", self.network):
            raise ConfigError(f"network {self.network!r} is not a CAIP-2 identifier")
        object.__setattr__(self, "address", checked_address(self.address, "asset address"))

    @property
    def chain_id(self) -> int:
        """The EIP-155 chain id of an ``eip155:N`` network."""
        namespace, _, reference = self.network.partition(":")
        if namespace != "eip155" or not reference.isdigit():
            raise ConfigError(f"{self.network} is not an eip155 network")
        return int(reference)

    @property
    def caip19(self) -> str:
        """The CAIP-19 asset id, e.g. ``eip155:8453/erc20:0x8335...``."""
        return f"{self.network}/erc20:{self.address}"

    @property
    def is_testnet(self) -> bool:
        return self.network not in _MAINNETS

    def parse(self, price: Price) -> int:
        """``price`` in atomic units of this asset (see :func:`parse_price`)."""
        return parse_price(price, self)

    def format(self, amount: int) -> str:
        """``amount`` atomic units in display units, e.g. ``10000`` -> ``"0.01"``."""
        return format_amount(amount, self.decimals)


_PRICE_RE = re.compile(
    r"(?P<dollar>\$)?(?P<number>[0-9]+(?:\.[0-9]+)?)(?:\s+(?P<symbol>[A-Za-z0-9.]+))?"
)


def parse_price(price: Price, asset: Asset) -> int:
    """A price in atomic units of ``asset``.

    Accepts an int (already atomic), a :class:`~decimal.Decimal` or a plain number string (display
    units), ``"0.01 USDC"`` (the symbol must be the asset's), or ``"$0.01"`` (the asset must be pegged
    to USD). Floats are refused (they are not exact), and so are zero, negatives, and anything finer
    than the asset's decimals.
    """
    if isinstance(price, (bool, float)):
        raise ConfigError("prices must be exact: use an int of atomic units, a str or a Decimal")
    if isinstance(price, int):
        atomic = price
    elif isinstance(price, Decimal):
        atomic = _to_atomic(price, asset, str(price))
    elif isinstance(price, str):
        match = _PRICE_RE.fullmatch(price.strip()) if len(price) <= 120 else None
        if match is None:
            raise ConfigError(f"cannot read price {price!r}: use '$0.01', '0.01 USDC' or '0.01'")
        if match["dollar"] and match["symbol"]:
            raise ConfigError(f"price {price!r} has both '$' and a symbol")
        if match["dollar"] and asset.peg != "USD":
            raise ConfigError(f"price {price!r} is in dollars but {asset.symbol} is not USD-pegged")
        if match["symbol"] and match["symbol"].upper() != asset.symbol.upper():
            raise ConfigError(f"price {price!r} is not in {asset.symbol}")
        atomic = _to_atomic(Decimal(match["number"]), asset, price)
    else:
        raise ConfigError(f"unsupported price type {type(price).__name__}")
    if atomic <= 0:
        raise ConfigError(f"price {price!r} must be greater than zero")
    if atomic > UINT256_MAX:
        raise ConfigError(f"price {price!r} exceeds uint256")
    return atomic


def _to_atomic(value: Decimal, asset: Asset, shown: str) -> int:
    # Integer arithmetic on the digits: Decimal's own operations round to the context's 28
    # significant digits, which would quietly change a large price.
    if not value.is_finite():
        raise ConfigError(f"price {shown!r} is not a finite number")
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # only NaN and infinities have a str exponent
        raise ConfigError(f"price {shown!r} is not a finite number")
    mantissa = int("".join(map(str, digits)) or "0")
    shift = exponent + asset.decimals
    if mantissa and len(digits) + shift > 80:
        raise ConfigError(f"price {shown!r} exceeds uint256")
    atomic: int
    if shift >= 0:
        atomic = mantissa * 10**shift
    else:
        atomic, remainder = divmod(mantissa, 10**-shift)
        if remainder:
            raise ConfigError(
                f"price {shown!r} is finer than {asset.symbol}'s {asset.decimals} decimals"
            )
    return -atomic if sign else atomic


def format_amount(amount: int, decimals: int) -> str:
    """Atomic units as a display string with no exponent and no trailing zeros."""
    if amount < 0:
        return "-" + format_amount(-amount, decimals)
    whole, frac = divmod(amount, 10**decimals)
    if frac == 0:
        return str(whole)
    return f"{whole}.{frac:0{decimals}d}".rstrip("0")


class AssetRegistry:
    """Known assets, found by (network, address); the first one registered for a network is its
    default (used when a route names only a network)."""

    def __init__(self, assets: tuple[Asset, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, str], Asset] = {}
        self._default: dict[str, Asset] = {}
        for asset in assets:
            self.register(asset)

    def register(self, asset: Asset, *, default: bool = False) -> Asset:
        """Add ``asset`` (replacing one at the same network and address)."""
        with self._lock:
            self._by_key[(asset.network, asset.address.lower())] = asset
            if default or asset.network not in self._default:
                self._default[asset.network] = asset
        return asset

    def find(self, network: str, address: str) -> Asset | None:
        """The asset at ``address`` on ``network``, if known."""
        return self._by_key.get((network, address.lower()))

    def default_for(self, network: str) -> Asset:
        """The default asset of ``network``."""
        try:
            return self._default[network]
        except KeyError:
            raise ConfigError(f"no asset registered for network {network}") from None

    def __iter__(self) -> Iterator[Asset]:
        return iter(list(self._by_key.values()))


_MAINNETS = frozenset({"eip155:1", "eip155:8453", "eip155:137", "eip155:42161", "eip155:43114"})

# Addresses and EIP-712 domains as the official SDKs ship them. Mind the names: Base mainnet's USDC
# signs as "USD Coin", Base Sepolia's as "USDC"; a wrong name makes every signature invalid.
BASE_USDC = Asset(
    "eip155:8453", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", 6, "USDC", "USD Coin", "2", "USD"
)
BASE_SEPOLIA_USDC = Asset(
    "eip155:84532", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", 6, "USDC", "USDC", "2", "USD"
)
# The test USDC of farebox's embedded chain: its chain id is py-evm's fixed test id and the token
# is the first contract development account #0 deploys, so every devchain has it at this address.
DEVCHAIN_USDC = Asset(
    "eip155:131277322940537",
    "0x5FbDB2315678afecb367f032d93F642f64180aa3",
    6,
    "USDC",
    "USD Coin",
    "2",
    "USD",
)

ASSETS = AssetRegistry(
    (
        BASE_USDC,
        BASE_SEPOLIA_USDC,
        DEVCHAIN_USDC,
        Asset(
            "eip155:1",
            "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48",
            6,
            "USDC",
            "USD Coin",
            "2",
            "USD",
        ),
        Asset(
            "eip155:43114",
            "0xB97EF9Ef8734C71904D8002F8b6Bc66Dd9c48a6E",
            6,
            "USDC",
            "USD Coin",
            "2",
            "USD",
        ),
        Asset(
            "eip155:137",
            "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359",
            6,
            "USDC",
            "USD Coin",
            "2",
            "USD",
        ),
        Asset(
            "eip155:42161",
            "0xaf88d065e77c8cC2239327C5EDb3A432268e5831",
            6,
            "USDC",
            "USD Coin",
            "2",
            "USD",
        ),
        Asset(
            "eip155:421614",
            "0x75faf114eafb1BDbe2F0316DF893fd58CE46AA4d",
            6,
            "USDC",
            "USD Coin",
            "2",
            "USD",
        ),
    )
)
