from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farebox.errors import ConfigError
from farebox.money import (
    ASSETS,
    BASE_SEPOLIA_USDC,
    BASE_USDC,
    Asset,
    AssetRegistry,
    format_amount,
    parse_price,
)


@pytest.mark.parametrize(
    ("price", "atomic"),
    [
        ("$0.01", 10_000),
        ("0.01 USDC", 10_000),
        ("0.01 usdc", 10_000),
        ("0.01", 10_000),
        ("  $1  ", 1_000_000),
        (Decimal("0.000001"), 1),
        (Decimal("12.5"), 12_500_000),
        (10_000, 10_000),
    ],
)
def test_prices_become_atomic_units(price: object, atomic: int) -> None:
    assert parse_price(price, BASE_SEPOLIA_USDC) == atomic  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("price", "why"),
    [
        ("0.0000001", "finer than"),
        (Decimal("0.0000001"), "finer than"),
        ("0", "greater than zero"),
        (0, "greater than zero"),
        (-5, "greater than zero"),
        ("-0.01", "cannot read"),
        ("$-1", "cannot read"),
        (0.01, "exact"),
        (True, "exact"),
        ("1e-2", "cannot read"),
        ("0.01 DAI", "not in USDC"),
        ("$0.01 USDC", "both"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        (2**256, "uint256"),
        (Decimal("1e999999999"), "uint256"),
        (Decimal("-0.01"), "greater than zero"),
        ("1" * 200, "cannot read"),
        ("", "cannot read"),
        ("1,000", "cannot read"),
    ],
)
def test_bad_prices_are_refused_never_rounded(price: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_price(price, BASE_SEPOLIA_USDC)  # type: ignore[arg-type]


def test_dollar_prices_need_a_usd_pegged_asset() -> None:
    weth = Asset(
        "eip155:8453",
        "0x4200000000000000000000000000000000000006",
        18,
        "WETH",
        "Wrapped Ether",
        "1",
    )
    with pytest.raises(ConfigError, match="not USD-pegged"):
        parse_price("$1", weth)
    assert parse_price("0.5 WETH", weth) == 5 * 10**17


@given(st.integers(min_value=1, max_value=10**30), st.integers(min_value=0, max_value=18))
def test_format_then_parse_is_identity(amount: int, decimals: int) -> None:
    asset = Asset("eip155:1", "0x" + "11" * 20, decimals, "TOK", "Token", "1")
    shown = format_amount(amount, decimals)
    assert "e" not in shown.lower()
    assert parse_price(shown, asset) == amount


def test_large_prices_keep_every_digit() -> None:
    # Decimal arithmetic rounds to 28 significant digits by default; prices must not.
    asset = Asset("eip155:1", "0x" + "11" * 20, 18, "TOK", "Token", "1")
    assert parse_price("12345678901234567890.123456789012345678", asset) == (
        12345678901234567890123456789012345678
    )


def test_format_amount_drops_trailing_zeros() -> None:
    assert format_amount(10_000, 6) == "0.01"
    assert format_amount(1_000_000, 6) == "1"
    assert format_amount(1_230_000, 6) == "1.23"
    assert format_amount(-500, 6) == "-0.0005"
    assert format_amount(7, 0) == "7"


def test_builtin_assets_carry_the_eip712_domains_of_the_sdks() -> None:
    assert (BASE_USDC.network, BASE_USDC.name, BASE_USDC.version) == (
        "eip155:8453",
        "USD Coin",
        "2",
    )
    assert (BASE_SEPOLIA_USDC.network, BASE_SEPOLIA_USDC.name) == ("eip155:84532", "USDC")
    assert BASE_SEPOLIA_USDC.address == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert BASE_USDC.decimals == BASE_SEPOLIA_USDC.decimals == 6
    assert BASE_SEPOLIA_USDC.chain_id == 84532
    assert BASE_SEPOLIA_USDC.is_testnet
    assert not BASE_USDC.is_testnet
    assert BASE_USDC.caip19 == "eip155:8453/erc20:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"


def test_registry_finds_assets_case_insensitively_and_knows_defaults() -> None:
    assert ASSETS.find("eip155:84532", BASE_SEPOLIA_USDC.address.lower()) is BASE_SEPOLIA_USDC
    assert ASSETS.find("eip155:8453", BASE_SEPOLIA_USDC.address) is None
    assert ASSETS.default_for("eip155:8453") is BASE_USDC
    registry = AssetRegistry()
    with pytest.raises(ConfigError, match="no asset"):
        registry.default_for("eip155:1")
    token = registry.register(
        Asset(
            "eip155:31337",
            "0x5fbdb2315678afecb367f032d93f642f64180aa3",
            6,
            "TUSD",
            "Test USD",
            "2",
            "USD",
        )
    )
    assert token.address == "0x5FbDB2315678afecb367f032d93F642f64180aa3"  # EIP-55 form
    assert registry.default_for("eip155:31337") is token


@pytest.mark.parametrize(
    "kwargs",
    [
        {"address": "0x123"},
        {"decimals": 40},
        {"network": "base-sepolia"},
    ],
)
def test_malformed_assets_are_refused(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "network": "eip155:1",
        "address": "0x" + "22" * 20,
        "decimals": 6,
        "symbol": "T",
        "name": "T",
        "version": "1",
    }
    fields.update(kwargs)
    with pytest.raises(ConfigError):
        Asset(**fields)  # type: ignore[arg-type]
