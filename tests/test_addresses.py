"""What a person types is read when the object is built: an address with a wrong EIP-55 checksum is
refused in a route, an asset, a TOML config and the CLI (the payment would go to the typo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from farebox.config import load_config
from farebox.errors import ConfigError
from farebox.eth import checksum_address
from farebox.money import DEVCHAIN_USDC, Asset
from farebox.protocol.models import Offer
from farebox.server.routes import RequestInfo, RouteTable

# The address: development account #3 with one digit wrong (...4294BC for ...4293BC),
# its letters still in that account's mixed case. Re-checksummed, it is a valid address nobody holds.
TYPO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4294BC"
RIGHT = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
# Without a checksum (all lower or all upper case) EIP-55 has nothing to check: taken as written.
SPELLINGS = [RIGHT, RIGHT.lower(), "0x" + RIGHT[2:].upper()]
# The devchain USDC with the case of one letter flipped.
ASSET_TYPO = "0x5fbDB2315678afecb367f032d93F642f64180aa3"
WEATHER = RequestInfo("GET", "/weather", "https://api.test/weather", {})


def refused_as_typo(raised: pytest.ExceptionInfo[ConfigError], where: str, typo: str) -> None:
    message = str(raised.value)
    assert message.startswith(f"{where}: {typo} has a wrong EIP-55 checksum"), message
    assert "must carry its EIP-55 checksum" in message
    # The checksum of the mistyped hex would be a valid address to paste back: never shown.
    assert checksum_address(typo) not in message


def toml(path: Path, **payment: str) -> Path:
    lines = ['[server]\nstore = "memory"\n[payment]\nnetwork = "devchain"']
    lines += [f'{key} = "{value}"' for key, value in {"pay_to": RIGHT, **payment}.items()]
    lines.append('[settlement]\nledger = "embedded"\n[[routes]]\npath = "/weather"')
    lines.append('price = "$0.01"\n')
    path.write_text("\n".join(lines))
    return path


def offer(pay_to: str = RIGHT, asset: Asset = DEVCHAIN_USDC) -> Offer:
    route = RouteTable().add("GET", "/weather", "$0.01", assets=asset, pay_to=pay_to)
    return route.offers(WEATHER)[0]


# --- the one reader ------------------------------------------------------------------------------


def test_checked_address_takes_eip55_spellings_and_refuses_a_typo() -> None:
    from farebox.eth import checked_address

    for spelling in SPELLINGS:
        assert checked_address(spelling, "pay_to") == RIGHT
    with pytest.raises(ConfigError) as raised:
        checked_address(TYPO, "pay_to")
    refused_as_typo(raised, "pay_to", TYPO)
    # All lower case carries no checksum, so the same typo written so cannot be caught.
    assert checked_address(TYPO.lower()) == checksum_address(TYPO)
    with pytest.raises(ConfigError, match="'0x3C44' is not a 0x-prefixed 20-byte hex address"):
        checked_address("0x3C44", "pay_to")


# --- the server: routes, assets, the TOML config, the CLI ----------------------------------------


def test_route_table_add_refuses_a_pay_to_with_a_wrong_checksum() -> None:
    with pytest.raises(ConfigError) as raised:
        RouteTable().add("GET", "/weather", "$0.01", assets=DEVCHAIN_USDC, pay_to=TYPO)
    refused_as_typo(raised, "pay_to", TYPO)
    for spelling in SPELLINGS:
        assert offer(pay_to=spelling).pay_to == RIGHT


def test_an_asset_registered_with_a_wrong_checksum_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        Asset(DEVCHAIN_USDC.network, ASSET_TYPO, 6, "USDC", "USD Coin", "2", "USD")
    refused_as_typo(raised, "asset address", ASSET_TYPO)
    lower = Asset(DEVCHAIN_USDC.network, DEVCHAIN_USDC.address.lower(), 6, "USDC", "USD Coin", "2")
    assert lower.address == DEVCHAIN_USDC.address


@pytest.mark.parametrize(
    ("key", "typo"), [("pay_to", TYPO), ("asset", ASSET_TYPO)], ids=["pay_to", "asset"]
)
def test_the_toml_config_refuses_an_address_with_a_wrong_checksum(
    key: str, typo: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(toml(tmp_path / "api.toml", **{key: typo}), env={})
    refused_as_typo(raised, f"payment.{key}", typo)


def test_the_toml_config_takes_addresses_without_a_checksum(tmp_path: Path) -> None:
    lower = toml(tmp_path / "lower.toml", pay_to=RIGHT.lower(), asset=DEVCHAIN_USDC.address.lower())
    config = load_config(lower, env={})
    assert config.pay_to == RIGHT
    assert config.asset == DEVCHAIN_USDC
    upper = toml(tmp_path / "upper.toml", pay_to="0x" + RIGHT[2:].upper())
    assert load_config(upper, env={}).routes[0].route.pay_to == RIGHT


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["reconcile", "--list"]])
def test_the_cli_refuses_a_config_whose_pay_to_has_a_wrong_checksum(
    command: list[str], tmp_path: Path
) -> None:
    config = toml(tmp_path / "api.toml", pay_to=TYPO)
    result = subprocess.run(
        [sys.executable, "-m", "farebox.cli", command[0], str(config), *command[1:]],
        capture_output=True,
        text=True,
        timeout=30,  # before the check, `serve` started a server paying the typo and kept running
        check=False,
    )
    assert result.returncode == 1
    assert f"payment.pay_to: {TYPO} has a wrong EIP-55 checksum" in result.stdout + result.stderr
    assert checksum_address(TYPO) not in result.stdout + result.stderr
