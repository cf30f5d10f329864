"""The agent's choices that need no server: which offer, what the policy allows, where the key comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from farebox.agent.agent import Agent
from farebox.agent.budget import Budget, Limits
from farebox.agent.policy import Policy
from farebox.agent.wallet import KEY_ENV, load_wallet
from farebox.errors import ConfigError, PaymentError
from farebox.eth import EvmAccount
from farebox.money import BASE_SEPOLIA_USDC, BASE_USDC, DEVCHAIN_USDC, Asset
from farebox.protocol.models import Challenge, Offer, Resource

PAY_TO = "0x" + "33" * 20


def offer(asset: Asset, amount: int, **extra: str) -> Offer:
    domain = {"name": asset.name, "version": asset.version} | extra
    return Offer("exact", asset.network, amount, asset.address, PAY_TO, extra=domain)


def challenge(*offers: Offer) -> Challenge:
    return Challenge(Resource("https://api.test/x"), offers)


def test_picks_the_cheapest_payable_offer_not_the_first() -> None:
    agent = Agent(EvmAccount.generate())
    picked, asset = agent.choose(
        challenge(
            offer(BASE_USDC, 30_000), offer(BASE_SEPOLIA_USDC, 20_000), offer(DEVCHAIN_USDC, 25_000)
        )
    )
    assert (picked.network, picked.amount) == (BASE_SEPOLIA_USDC.network, 20_000)
    assert asset == BASE_SEPOLIA_USDC


def test_policy_skips_what_it_does_not_allow() -> None:
    agent = Agent(EvmAccount.generate(), policy=Policy.build(networks=[DEVCHAIN_USDC.network]))
    picked, _ = agent.choose(challenge(offer(BASE_SEPOLIA_USDC, 1), offer(DEVCHAIN_USDC, 5)))
    assert picked.network == DEVCHAIN_USDC.network


def test_nothing_payable_names_every_reason() -> None:
    unknown = Offer(
        "exact", "eip155:999", 1, "0x" + "44" * 20, PAY_TO, extra={"name": "X", "version": "1"}
    )
    wrong_domain = offer(
        BASE_SEPOLIA_USDC, 1, name="USD Coin"
    )  # Base Sepolia's token signs as "USDC"
    other_scheme = Offer("upto", BASE_USDC.network, 1, BASE_USDC.address, PAY_TO)
    agent = Agent(EvmAccount.generate(), policy=Policy.build(payees=["0x" + "55" * 20]))
    with pytest.raises(PaymentError) as refused:
        agent.choose(challenge(unknown, wrong_domain, other_scheme, offer(BASE_USDC, 1)))
    assert refused.value.code == "no_payable_offer"
    message = refused.value.message
    assert "unknown asset" in message
    assert "payee" in message


def test_budget_refuses_before_anything_is_signed() -> None:
    budget = Budget(
        None, Limits(per_request=Budget.from_prices(None, per_request="$0.01").limits.per_request)
    )
    agent = Agent(EvmAccount.generate(), budget=budget)
    from farebox.agent.agent import Answer
    from farebox.protocol.challenge import render_challenge

    rendered = render_challenge(challenge(offer(BASE_USDC, 20_000)))
    flow = agent.pay(
        "GET", "https://api.test/x", Answer(402, dict(rendered.headers), rendered.body)
    )
    with pytest.raises(PaymentError) as refused:
        next(flow)
    assert refused.value.code == "budget_exceeded"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.test/x", True),
        ("http://127.0.0.1:8402/x", True),
        ("http://localhost/x", True),
        ("http://api.test/x", False),
        ("ftp://api.test/x", False),
    ],
)
def test_plain_http_only_on_loopback(url: str, allowed: bool) -> None:
    policy = Policy()
    if allowed:
        policy.check_url(url)
    else:
        with pytest.raises(PaymentError, match="policy_refused"):
            policy.check_url(url)


def test_host_allow_list() -> None:
    policy = Policy.build(hosts=["api.test", "*.example.com"])
    policy.check_url("https://api.test/a")
    policy.check_url("https://eu.example.com/a")
    with pytest.raises(PaymentError):
        policy.check_url("https://example.org/a")


def test_wallet_from_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "ab" * 32
    key_file = tmp_path / "key"
    key_file.write_text(secret)
    assert load_wallet(key_file).address == EvmAccount.from_hex(secret).address
    monkeypatch.setenv(KEY_ENV, secret)
    assert load_wallet().address == EvmAccount.from_hex(secret).address
    monkeypatch.setenv(KEY_ENV, "not a key " + secret[:10])
    with pytest.raises(ConfigError) as bad:
        load_wallet()
    assert secret[:10] not in str(bad.value)  # the error never echoes the key
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=KEY_ENV):
        load_wallet()
