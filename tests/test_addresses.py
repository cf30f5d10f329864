"""What a person types is read when the object is built: an address with a wrong EIP-55 checksum is
refused in a route, a TOML config, the CLI and an agent's policy (the payment would go to the typo),
and a policy's network names and origins mean what they say instead of refusing every request."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from farebox.agent.agent import Agent
from farebox.agent.budget import Budget
from farebox.agent.httpx_auth import PaymentAuth
from farebox.agent.policy import Policy
from farebox.config import build_app, load_config, parse_config
from farebox.dev.devchain import DevChain
from farebox.errors import ConfigError, PaymentError
from farebox.eth import checksum_address
from farebox.money import BASE_SEPOLIA_USDC, DEVCHAIN_USDC, Asset
from farebox.protocol.models import Offer
from farebox.server.routes import RequestInfo, RouteTable
from tests.support.chain import fund
from tests.support.servers import serve

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


def document(**payment: str) -> dict[str, Any]:
    return {
        "server": {"store": "memory"},
        "payment": {"network": "devchain", "pay_to": RIGHT, **payment},
        "settlement": {"ledger": "embedded"},
        "routes": [{"path": "/weather", "price": "$0.01", "content": '{"forecast": "sunny"}'}],
    }


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


# --- the agent's policy --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["payees", "assets"])
def test_policy_refuses_an_address_with_a_wrong_checksum_when_built(field: str) -> None:
    kwargs: dict[str, Any] = {field: [TYPO]}
    with pytest.raises(ConfigError) as raised:
        Policy.build(**kwargs)
    refused_as_typo(raised, field, TYPO)


def test_policy_payees_in_any_eip55_spelling_allow_that_payee_only() -> None:
    stranger = "0x" + "55" * 20
    for spelling in SPELLINGS:
        policy = Policy.build(payees=[spelling, "profile_test_seller"])
        assert policy.refusal(offer(pay_to=RIGHT), DEVCHAIN_USDC) is None
        assert policy.refusal(offer(pay_to=stranger), DEVCHAIN_USDC) == (
            f"payee {checksum_address(stranger)} is not allowed"
        )
    with pytest.raises(ConfigError, match="'acct_1' is neither an EVM address"):
        Policy.build(payees=["acct_1"])


def test_policy_network_names_are_their_caip2_ids() -> None:
    policy = Policy.build(networks=["devchain", "base-sepolia"])
    assert policy.networks == frozenset({DEVCHAIN_USDC.network, BASE_SEPOLIA_USDC.network})
    assert policy.refusal(offer(), DEVCHAIN_USDC) is None
    assert policy.refusal(offer(asset=BASE_SEPOLIA_USDC), BASE_SEPOLIA_USDC) is None
    assert Policy.build(networks=["Stripe"]).card_refusal("profile_x") is None


@pytest.mark.parametrize(
    ("networks", "message"),
    [
        (["devnet"], "networks: 'devnet' is neither a CAIP-2 id"),
        (["eip155:08453"], "networks: 'eip155:08453': an eip155 reference is the decimal chain id"),
        ("devchain", "networks: a list of strings, not one string"),
    ],
)
def test_policy_refuses_a_network_it_could_never_match(networks: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Policy.build(networks=networks)
    assert str(raised.value).startswith(message), str(raised.value)
    if networks == ["devnet"]:
        assert "devchain" in str(raised.value)  # the accepted names are listed


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        (["https://api.test/v1"], "(no path, query or user name)"),
        (["user@api.test"], "(no path, query or user name)"),
        (["ftp://api.test"], "(origins are https or http)"),
        (["api.test:99999"], "(a port is a number from 1 to 65535)"),
        (["api.test:"], "(a port is a number from 1 to 65535)"),
        (["-api.test"], "write one of: api.example.com, *.example.com"),
        (["*.127.0.0.1"], "write one of: api.example.com, *.example.com"),
        (["bücher.test"], "(write an international name in its ASCII xn-- form)"),
        (["http://api.test"], "is plain http off the loopback interface"),
        ("api.test", "hosts: a list of strings, not one string"),
    ],
)
def test_policy_refuses_a_host_it_could_never_match(hosts: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Policy.build(hosts=hosts)
    assert str(raised.value).startswith("hosts: ")
    assert message in str(raised.value), str(raised.value)


def test_policy_host_ports_and_origins_are_honoured() -> None:
    policy = Policy.build(
        hosts=["API.test", "*.example.com", "pay.test:8443", "https://origin.test", "[::1]:9"]
    )
    assert policy.hosts == frozenset(
        {"api.test", "*.example.com", "pay.test:8443", "https://origin.test", "[::1]:9"}
    )
    for url in (
        "https://api.test:1234/a",
        "https://eu.example.com/a",
        "https://pay.test:8443/a",
        "https://origin.test/a",
        "https://origin.test:443/a",
        "http://[::1]:9/a",
    ):
        policy.check_url(url)
    for url, shown in (
        ("https://example.com/a", "https://example.com"),
        ("https://pay.test/a", "https://pay.test"),
        ("https://origin.test:8443/a", "https://origin.test:8443"),
        ("http://[::1]:10/a", "http://[::1]:10"),
    ):
        with pytest.raises(PaymentError, match=re.escape(f"{shown} is not in the agent's")):
            policy.check_url(url)
    assert Policy.build(hosts=["http://api.test"], allow_http=True).hosts == frozenset(
        {"http://api.test"}
    )


# --- the agent paying a real server with a policy spelled so -------------------------------------


@pytest.fixture(scope="module")
def api(chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = parse_config(document(), base_dir=tmp_path_factory.mktemp("api"), env={})
    with serve(build_app(config, chain=chain)) as base:
        yield base


def get(policy: Policy, payer: Any, url: str) -> httpx.Response:
    agent = Agent(payer, budget=Budget.from_prices(None, per_request="$0.05"), policy=policy)
    with httpx.Client(auth=PaymentAuth(agent), timeout=30) as client:
        return client.get(url)


def test_an_agent_allowing_network_devchain_pays_on_the_devchain(chain: DevChain, api: str) -> None:
    payer = fund(chain, 50_000)
    response = get(Policy.build(networks=["devchain"]), payer, api + "/weather")
    assert response.status_code == 200
    assert response.json() == {"forecast": "sunny"}
    assert chain.balance_of(payer.address) == 40_000


def test_an_agent_allowing_an_origin_pays_there_and_nowhere_else(chain: DevChain, api: str) -> None:
    payer = fund(chain, 50_000)
    assert api.startswith("http://127.0.0.1:")
    response = get(Policy.build(hosts=[api]), payer, api + "/weather")
    assert response.status_code == 200
    assert chain.balance_of(payer.address) == 40_000
    port = int(api.rsplit(":", 1)[1])
    elsewhere = Policy.build(hosts=[f"http://127.0.0.1:{port + 1}"])
    with pytest.raises(PaymentError, match=f"http://127.0.0.1:{port} is not in the agent's"):
        get(elsewhere, payer, api + "/weather")
    assert chain.balance_of(payer.address) == 40_000
