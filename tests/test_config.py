"""The TOML server config: every mistake named by its key, the examples, the app it builds (a 402
then a paid 200 on the embedded chain), and ``farebox serve`` in its own process."""

from __future__ import annotations

import copy
import json
import os
import stat
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
from farebox.config import (
    CardConfig,
    EmbeddedSettlement,
    FacilitatorSettlement,
    RpcSettlement,
    ServerConfig,
    app_from_env,
    build_app,
    load_config,
    parse_config,
)
from farebox.dev.devchain import DevChain
from farebox.errors import ConfigError, PaymentError
from farebox.facilitator.local import LocalFacilitator
from farebox.money import BASE_SEPOLIA_USDC, DEVCHAIN_USDC
from farebox.receipts.keys import load_signing_key
from farebox.server.routes import CardOffer, RequestInfo
from tests.support.chain import fund
from tests.support.processes import DEV_KEYS
from tests.support.servers import free_port, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
FACILITATOR = "https://facilitator.test/x402"


def valid() -> dict[str, Any]:
    return {
        "server": {"store": "memory"},
        "payment": {"network": "devchain", "pay_to": PAY_TO},
        "settlement": {"ledger": "embedded"},
        "routes": [
            {"path": "/weather", "price": "$0.01"},
            {"method": "POST", "path": "/reports/{id}", "price": 250_000},
        ],
    }


def parse(document: dict[str, Any], tmp_path: Path, **kwargs: Any) -> ServerConfig:
    kwargs.setdefault("env", {})
    return parse_config(document, base_dir=tmp_path, **kwargs)


def test_a_valid_document(tmp_path: Path) -> None:
    config = parse(valid(), tmp_path)
    assert config.asset == DEVCHAIN_USDC
    assert config.settlement == EmbeddedSettlement()
    assert config.store is None
    assert [entry.route.name for entry in config.routes] == ["GET /weather", "POST /reports/{id}"]
    assert config.routes[1].route.amounts(RequestInfo("POST", "/reports/1", "", {})) == (250_000,)
    assert len(config.route_table()) == 2


def edit(path: str, value: Any) -> dict[str, Any]:
    """``valid()`` with ``path`` (``a.b``, ``routes.1.price``) set to ``value`` (or removed when
    ``value`` is ``DELETE``)."""
    document = copy.deepcopy(valid())
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return document


DELETE = object()

ERRORS = [
    ("color", "blue", "color: unknown key"),
    ("server.stor", "memory", "server.stor: unknown key"),
    ("server", "memory", "server: must be a table"),
    ("server.store", DELETE, "server.store: required"),
    ("server.store", 5, "server.store: must be a string"),
    ("server.store", " ", "server.store: must not be empty"),
    ("server.issuer", "http://api.test", "server.issuer: 'http://api.test' is not an https origin"),
    ("server.issuer", "https://api.test/v1", "server.issuer"),
    ("server.issuer", "https://api.test", "server.receipt_key: required with server.issuer"),
    ("server.upstream", "ftp://x.test", "server.upstream: 'ftp://x.test' is not an http(s) URL"),
    ("server.upstream", "http://x.test/?a=1", "server.upstream: must not have a query"),
    ("server.upstream_timeout", 0, "server.upstream_timeout: must be more than 0"),
    ("server.upstream_timeout", "5", "server.upstream_timeout: must be a number"),
    ("server.log_challenges", "no", "server.log_challenges: must be true or false"),
    ("server.traffic_retention", -1, "server.traffic_retention: must be a whole number"),
    ("server.traffic_keep", 1.5, "server.traffic_keep: must be a whole number"),
    ("server.traffic_keep", True, "server.traffic_keep: must be a whole number"),
    (
        "settlement.reconcile_rpc_url",
        "http://node.test",
        "settlement.reconcile_rpc_url: only used with a facilitator",
    ),
    ("settlement.reconcile_rpc_url", "ftp://x", "settlement.reconcile_rpc_url: "),
    ("payment", DELETE, "payment: the [payment] table is required"),
    ("payment.network", DELETE, "payment.network: required"),
    ("payment.network", "eip155:999999", "payment.network: no known asset on 'eip155:999999'"),
    ("payment.asset", "0x123", "payment.asset: '0x123' is not a 0x-prefixed"),
    (
        "payment.asset",
        "0x" + "11" * 20,
        "payment.asset: 0x1111111111111111111111111111111111111111",
    ),
    ("payment.pay_to", DELETE, "payment.pay_to: required"),
    ("payment.pay_to", "0xnope", "payment.pay_to: '0xnope' is not"),
    ("payment.payto", PAY_TO, "payment.payto: unknown key"),
    ("settlement", DELETE, "settlement: required"),
    ("settlement.ledger", "anvil", "settlement.ledger: 'anvil' is unknown"),
    ("settlement.rpc_url", "http://node.test", "settlement: choose one of ledger, rpc_url"),
    ("settlement.settler_key", "k", "settlement.settler_key: only used with settlement.rpc_url"),
    ("settlement.token_env", "TOKEN", "settlement.token_env: only used with a facilitator"),
    ("settlement.timeout", -1, "settlement.timeout: must be more than 0"),
    ("settlement.legder", "embedded", "settlement.legder: unknown key"),
    ("routes", DELETE, "routes: at least one [[routes]] table is required"),
    ("routes", [], "routes: at least one"),
    ("routes", {"path": "/x"}, "routes: must be an array of tables"),
    ("routes.1.price", DELETE, "routes[1].price: required"),
    ("routes.1.price", 0.01, "routes[1].price: write it as a string"),
    ("routes.1.price", True, "routes[1].price: must be a string or an integer"),
    ("routes.1.price", "$0.0000001", "routes[1].price: price '$0.0000001' is finer than"),
    ("routes.1.price", "0.01 ETH", "routes[1].price: price '0.01 ETH' is not in USDC"),
    ("routes.1.price", "cheap", "routes[1].price: cannot read price 'cheap'"),
    ("routes.1.price", 0, "routes[1].price: price 0 must be greater than zero"),
    ("routes.1.method", "FETCH", "routes[1].method: 'FETCH' is not one of"),
    ("routes.1.path", DELETE, "routes[1].path: required"),
    ("routes.1.path", "weather", "routes[1].path: 'weather' must start with '/'"),
    ("routes.1.path", "/a/{x}/{x}", "routes[1]: bad route path"),
    ("routes.1.max_timeout_seconds", 5, "routes[1].max_timeout_seconds: must be between"),
    ("routes.1.max_timeout_seconds", "60", "routes[1].max_timeout_seconds: must be an integer"),
    ("routes.1.description", 3, "routes[1].description: must be a string"),
    ("routes.1.mime", "text/plain", "routes[1].mime: unknown key"),
]


@pytest.mark.parametrize(("path", "value", "message"), ERRORS)
def test_each_mistake_names_its_key(path: str, value: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(edit(path, value), tmp_path)
    assert str(raised.value).startswith(message), str(raised.value)


def test_duplicate_route_names_the_first(tmp_path: Path) -> None:
    document = edit("routes.1", {"path": "/weather", "price": "$0.02"})
    with pytest.raises(ConfigError, match=r"routes\[1\]: GET /weather is already routes\[0\]"):
        parse(document, tmp_path)


def test_content_is_refused_behind_an_upstream(tmp_path: Path) -> None:
    document = edit("routes.0.content", "{}")
    document["server"]["upstream"] = "http://127.0.0.1:9000"
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.content: not used with server.upstream"):
        parse(document, tmp_path)


def test_embedded_needs_the_devchain_network(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'^settlement.ledger: "embedded" settles only'):
        parse(edit("payment.network", "eip155:84532"), tmp_path)


def test_rpc_settlement_needs_a_settler_key_and_hides_its_url(tmp_path: Path) -> None:
    document = edit("settlement", {"rpc_url": "https://node.test/secret-api-key"})
    with pytest.raises(ConfigError, match=r"^settlement.settler_key: required"):
        parse(document, tmp_path)
    document["settlement"]["rpc_url"] = "node.test/secret-api-key"
    with pytest.raises(ConfigError, match=r"^settlement.rpc_url: is not") as raised:
        parse(document, tmp_path)
    assert "secret" not in str(raised.value)
    document["settlement"] = {"rpc_url": "https://node.test/k", "settler_key": "keys/settler.key"}
    config = parse(document, tmp_path)
    assert isinstance(config.settlement, RpcSettlement)
    assert config.settlement.settler_key == tmp_path / "keys" / "settler.key"
    assert "node.test" not in repr(config.settlement)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    document = edit("server.store", "data/payments.sqlite")
    document["server"]["receipt_key"] = "receipts.key"
    (tmp_path / "conf").mkdir()
    file = tmp_path / "conf" / "farebox.toml"
    file.write_text(_toml(document))
    config = load_config(file, env={})
    assert config.store == tmp_path / "conf" / "data" / "payments.sqlite"
    assert config.receipt_key == tmp_path / "conf" / "receipts.key"
    assert config.source == file


def _toml(document: dict[str, Any]) -> str:
    # Enough TOML for these documents: tables of scalars and one array of tables.
    lines: list[str] = []
    for name, table in document.items():
        for entry in table if isinstance(table, list) else [table]:
            lines.append(f"[[{name}]]" if isinstance(table, list) else f"[{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in entry.items()]
    return "\n".join(lines) + "\n"


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nstore = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML: .*line 1"):
        load_config(bad)


def test_facilitator_from_config_env_and_override(tmp_path: Path) -> None:
    document = edit("payment.network", "eip155:84532")
    document["settlement"] = {"facilitator": FACILITATOR}
    config = parse(document, tmp_path)
    assert config.asset == BASE_SEPOLIA_USDC
    assert config.settlement == FacilitatorSettlement(FACILITATOR, "config")
    env = {"X402_FACILITATOR_URL": "https://env.test/f"}
    from_env = FacilitatorSettlement("https://env.test/f", "env")
    assert parse(document, tmp_path, env=env).settlement == from_env
    overridden = parse(document, tmp_path, env=env, facilitator="http://127.0.0.1:4021")
    assert overridden.settlement == FacilitatorSettlement("http://127.0.0.1:4021", "override")
    # The environment supplies a facilitator when the file names no settlement at all...
    del document["settlement"]
    assert parse(document, tmp_path, env=env).settlement == from_env
    # ... but never replaces a ledger the file chose.
    assert parse(valid(), tmp_path, env=env).settlement == EmbeddedSettlement()
    with pytest.raises(ConfigError, match=r"^X402_FACILITATOR_URL: 'nope' is not an http"):
        parse(document, tmp_path, env={"X402_FACILITATOR_URL": "nope"})
    with pytest.raises(ConfigError, match=r"^--facilitator: 'nope' is not an http"):
        parse(document, tmp_path, facilitator="nope")
    with pytest.raises(ConfigError, match=r"^settlement.facilitator: 'x' is not an http"):
        parse(edit("settlement", {"facilitator": "x"}), tmp_path)


def test_facilitator_token_comes_from_the_named_variable(tmp_path: Path) -> None:
    document = edit("settlement", {"facilitator": FACILITATOR, "token_env": "MY_TOKEN"})
    with pytest.raises(ConfigError, match=r"^settlement.token_env: environment variable MY_TOKEN"):
        parse(document, tmp_path)
    config = parse(document, tmp_path, env={"MY_TOKEN": "s3cret"})
    assert isinstance(config.settlement, FacilitatorSettlement)
    assert config.settlement.token == "s3cret"
    assert "s3cret" not in repr(config)
    # Without token_env, the facilitator client's own variable is read when set.
    del document["settlement"]["token_env"]
    config = parse(document, tmp_path, env={"FAREBOX_FACILITATOR_TOKEN": "t0ken"})
    assert isinstance(config.settlement, FacilitatorSettlement)
    assert config.settlement.token == "t0ken"


def test_the_examples_parse() -> None:
    devchain = load_config(EXAMPLES / "devchain.toml", env={})
    assert devchain.settlement == EmbeddedSettlement()
    assert devchain.store is None
    assert {entry.route.path for entry in devchain.routes} == {"/weather", "/reports/{id}"}
    # Its pay_to is a marked placeholder (0x...dEaD), well-formed so that the file parses.
    sepolia = load_config(EXAMPLES / "base-sepolia.toml", env={})
    assert sepolia.asset == BASE_SEPOLIA_USDC
    assert sepolia.settlement == FacilitatorSettlement("https://x402.org/facilitator", "config")
    assert sepolia.upstream == "http://127.0.0.1:9000"
    assert sepolia.store == EXAMPLES / "payments.sqlite"
    assert sepolia.issuer == "https://api.example.com"


def test_traffic_settings_reach_the_gate_and_the_reconciler(
    tmp_path: Path, chain: DevChain
) -> None:
    defaults = build_app(parse(valid(), tmp_path), chain=chain)
    assert defaults.gate.log_challenges is True
    assert (defaults.reconciler.traffic_retention, defaults.reconciler.traffic_keep) == (
        86_400,
        100_000,
    )
    document = valid()
    document["server"].update(log_challenges=False, traffic_retention=600, traffic_keep=5)
    config = parse(document, tmp_path)
    assert (config.log_challenges, config.traffic_retention, config.traffic_keep) == (
        False,
        600,
        5,
    )
    app = build_app(config, chain=chain)
    assert app.gate.log_challenges is False
    assert (app.reconciler.traffic_retention, app.reconciler.traffic_keep) == (600, 5)


def test_a_facilitator_server_reconciles_from_its_own_node(tmp_path: Path) -> None:
    pytest.importorskip("farebox.facilitator.remote")
    document = edit("payment.network", "eip155:84532")
    document["settlement"] = {"facilitator": FACILITATOR}
    blind = build_app(parse(document, tmp_path))
    assert blind.reconciler.ledgers == {}  # pending payments wait for an operator
    document["settlement"]["reconcile_rpc_url"] = "https://node.test/key-in-path"
    config = parse(document, tmp_path)
    assert "key-in-path" not in repr(config)
    [reader] = build_app(config).reconciler.ledgers.values()
    assert reader.network == "eip155:84532"
    assert not hasattr(reader, "settler")  # it reads; it holds no key and sends nothing


def test_remote_facilitator_is_built_from_the_config(tmp_path: Path) -> None:
    remote = pytest.importorskip("farebox.facilitator.remote")
    document = edit("payment.network", "eip155:84532")
    document["settlement"] = {"facilitator": FACILITATOR}
    app = build_app(parse(document, tmp_path))
    assert isinstance(app.gate.facilitator, remote.RemoteFacilitator)


# --- the app it builds ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_embedded_app_402_then_paid_200(chain: DevChain, anyio_backend: str) -> None:
    app = build_app(load_config(EXAMPLES / "devchain.toml", env={}), chain=chain)
    payer = fund(chain)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="https://api.test",
        auth=PaymentAuth(Agent(payer, budget=Budget.from_prices(None, per_request="$0.50"))),
    ) as http:
        unpaid = await http.get("/weather", auth=None)
        paid = await http.get("/weather")
        report = await http.get("/reports/42")
        health = await http.get("/health")
        missing = await http.get("/nothing")
    await app.aclose()
    assert unpaid.status_code == 402
    assert paid.status_code == 200
    assert paid.json()["forecast"] == "sunny"
    assert paid.headers["content-type"] == "application/json"
    assert "peac-receipt" in paid.headers
    assert report.json() == {
        "route": "GET /reports/{id}",
        "path": "/reports/42",
        "params": {"id": "42"},
    }
    assert health.json() == {"ok": True}
    assert missing.status_code == 404
    assert chain.balance_of(payer.address) == 1_000_000 - 10_000 - 250_000
    assert chain.balance_of(PAY_TO) > 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_lifespan_closes_the_store(
    chain: DevChain, tmp_path: Path, anyio_backend: str
) -> None:
    document = edit("server.store", "payments.sqlite")
    app = build_app(parse(document, tmp_path), chain=chain)
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    with pytest.raises(PaymentError, match=r"closed|unavailable"):
        await app.gate.store.claim("k", owner="o", now=1)
    await app.aclose()  # a second close does nothing


def test_receipt_key_is_created_then_reused(chain: DevChain, tmp_path: Path) -> None:
    document = edit("server.issuer", "https://api.test")
    document["server"]["receipt_key"] = "receipts.key"
    config = parse(document, tmp_path)
    first = build_app(config, chain=chain)
    assert first.receipt_key_created
    path = tmp_path / "receipts.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_signing_key(path).kid == first.gate.signing_key.kid
    assert first.gate.issuer == "https://api.test"
    second = build_app(config, chain=chain)
    assert not second.receipt_key_created
    assert second.gate.signing_key.kid == first.gate.signing_key.kid
    path.write_text("not a key")
    with pytest.raises(ConfigError, match=r"^server.receipt_key: .* is not an Ed25519"):
        build_app(config, chain=chain)


def test_unreadable_settler_key_names_the_key(tmp_path: Path) -> None:
    document = edit("payment.network", "eip155:84532")
    document["settlement"] = {"rpc_url": "https://node.test", "settler_key": "missing.key"}
    with pytest.raises(ConfigError, match=r"^settlement.settler_key: cannot read"):
        build_app(parse(document, tmp_path))
    (tmp_path / "settler.key").write_text(DEV_KEYS[1])
    document["settlement"]["settler_key"] = "settler.key"
    app = build_app(parse(document, tmp_path))
    assert isinstance(app.gate.facilitator, LocalFacilitator)  # on an HttpRpc, not yet connected


# --- farebox serve --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    # Run the command function itself, so this works before the lead registers it in cli.py.
    code = "import typer; from farebox.cli.serve import serve_command; typer.run(serve_command)"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(EXAMPLES / "devchain.toml"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/health")
        yield base, process
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_serve_answers_402_and_get_pays(served: tuple[str, subprocess.Popen[str]]) -> None:
    base, process = served
    assert httpx.get(base + "/weather").status_code == 402
    env = dict(os.environ, FAREBOX_PRIVATE_KEY=DEV_KEYS[3])
    paid = subprocess.run(
        [sys.executable, "-m", "farebox.cli", "get", base + "/weather"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert paid.returncode == 0, paid.stderr
    assert json.loads(paid.stdout)["forecast"] == "sunny"
    payment = json.loads(paid.stderr[paid.stderr.index("{") :])
    assert payment["paid"] == "0.01 USDC"
    assert payment["receipt_verified"] is True
    process.terminate()
    banner, _ = process.communicate(timeout=10)
    assert "GET     /weather" in banner
    assert "0.01 USDC" in banner
    assert PAY_TO in banner
    assert "embedded chain" in banner
    assert "did:key:" in banner
    for key in DEV_KEYS:
        assert key[2:] not in banner


def test_serve_reports_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[payment]\nnetwork = "devchain"\n')
    code = "import typer; from farebox.cli.serve import serve_command; typer.run(serve_command)"
    result = subprocess.run(
        [sys.executable, "-c", code, str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "E_CONFIG: server.store: required" in result.stderr


# --- [card]: card payments through Stripe --------------------------------------------------------

STRIPE_KEY = "sk_test_" + "Zq8" * 12  # what a key looks like; it must never be shown
CARD_SECRET = "ab" * 32
CARD_ENV = {"STRIPE_SECRET_KEY": STRIPE_KEY}


def with_card(**card: Any) -> dict[str, Any]:
    document = valid()
    document["card"] = {"network_id": "profile_test_farebox", **card}
    document["routes"][1]["card"] = True
    return document


def test_card_section_defaults_and_route_offers(tmp_path: Path) -> None:
    config = parse(with_card(), tmp_path, env=CARD_ENV)
    card = config.card
    assert isinstance(card, CardConfig)
    assert (card.network_id, card.realm, card.currency, card.minimum) == (
        "profile_test_farebox",
        "farebox",
        "usd",
        50,
    )
    assert card.secret_key == STRIPE_KEY
    assert card.secret_key_env == "STRIPE_SECRET_KEY"
    assert (card.challenge_secret, card.challenge_secret_env) == (None, None)
    assert (card.api_base, card.stripe_version, card.spt_parameter) == (None, None, "top_level")
    assert (card.lifetime, card.invoice_lifetime) == (300.0, 900.0)
    assert config.routes[0].route.card is None  # opt in per route
    offer = config.routes[1].route.card
    assert offer == CardOffer("profile_test_farebox", "farebox", "usd", None, 50, True, False)
    assert STRIPE_KEY not in repr(config)


def test_card_section_every_setting(tmp_path: Path) -> None:
    document = with_card(
        realm="api.example.com",
        currency="EUR",
        minimum=0,
        secret_key_env="MY_STRIPE",
        challenge_secret_env="MY_CARD_SECRET",
        api_base="http://127.0.0.1:12111/",
        stripe_version="2026-01-01.preview",
        spt_parameter="payment_method_data",
        lifetime=60,
        invoice_lifetime=3600,
    )
    document["routes"][1].update(card_amount=25, card_invoice=True, card_spt=False)
    env = {"MY_STRIPE": STRIPE_KEY, "MY_CARD_SECRET": CARD_SECRET}
    config = parse(document, tmp_path, env=env)
    card = config.card
    assert card is not None
    assert (card.realm, card.currency, card.minimum) == ("api.example.com", "eur", 0)
    assert card.secret_key == STRIPE_KEY
    assert card.challenge_secret == bytes.fromhex(CARD_SECRET)
    assert card.challenge_secret_env == "MY_CARD_SECRET"
    assert card.api_base == "http://127.0.0.1:12111"
    assert card.stripe_version == "2026-01-01.preview"
    assert card.spt_parameter == "payment_method_data"
    assert (card.lifetime, card.invoice_lifetime) == (60.0, 3600.0)
    offer = config.routes[1].route.card
    assert offer == CardOffer("profile_test_farebox", "api.example.com", "eur", 25, 0, False, True)
    assert STRIPE_KEY not in repr(config)
    assert CARD_SECRET not in repr(config)
    assert repr(bytes.fromhex(CARD_SECRET)) not in repr(config)


def test_card_realm_defaults_to_the_issuer_host(tmp_path: Path) -> None:
    document = with_card()
    document["server"].update(issuer="https://api.test", receipt_key="receipts.key")
    config = parse(document, tmp_path, env=CARD_ENV)
    assert config.card is not None
    assert config.card.realm == "api.test"


def test_card_challenge_secret_from_the_default_variable(tmp_path: Path) -> None:
    env = {**CARD_ENV, "FAREBOX_CARD_SECRET": CARD_SECRET}
    config = parse(with_card(), tmp_path, env=env)
    assert config.card is not None
    assert config.card.challenge_secret == bytes.fromhex(CARD_SECRET)
    assert config.card.challenge_secret_env == "FAREBOX_CARD_SECRET"


CARD_ERRORS = [
    ({"network_id": None}, None, "card.network_id: required"),
    ({"network_id": 5}, None, "card.network_id: must be a string"),
    ({"realm": ""}, None, "card.realm: must not be empty"),
    ({"currency": "dollars"}, None, "card.currency: 'dollars' is not a three-letter"),
    ({"minimum": -1}, None, "card.minimum: must be a non-negative integer"),
    ({"minimum": 0.5}, None, "card.minimum: must be a non-negative integer"),
    ({"minimum": True}, None, "card.minimum: must be a non-negative integer"),
    ({"secret_key_env": STRIPE_KEY + "-x"}, None, "card.secret_key_env: must name an environment"),
    ({"secret_key_env": "NOT_SET"}, None, "card.secret_key_env: environment variable NOT_SET"),
    (
        {"challenge_secret_env": "NOPE"},
        None,
        "card.challenge_secret_env: environment variable NOPE",
    ),
    ({"challenge_secret_env": "S"}, {"S": "zz" * 32}, "card.challenge_secret_env: S must hold hex"),
    ({"challenge_secret_env": "S"}, {"S": "ab" * 31}, "card.challenge_secret_env: S must hold at"),
    ({"api_base": "stripe"}, None, "card.api_base: 'stripe' is not an http(s) URL"),
    ({"api_base": "http://u:p@x.test"}, None, "card.api_base: must be a bare"),
    ({"stripe_version": 2026}, None, "card.stripe_version: must be a string"),
    ({"spt_parameter": "nested"}, None, "card.spt_parameter: 'nested' is not"),
    ({"lifetime": 0}, None, "card.lifetime: must be more than 0"),
    ({"lifetime": 86_401}, None, "card.lifetime: must be more than 0 and at most 86400"),
    ({"lifetime": "300"}, None, "card.lifetime: must be a number"),
    ({"invoice_lifetime": -1}, None, "card.invoice_lifetime: must be more than 0"),
    ({"require_client_secret": "yes"}, None, "card.require_client_secret: must be true or false"),
    ({"secret_key": STRIPE_KEY}, None, "card.secret_key: unknown key"),
]


@pytest.mark.parametrize(("changes", "env", "message"), CARD_ERRORS)
def test_each_card_mistake_names_its_key(
    changes: dict[str, Any], env: dict[str, str] | None, message: str, tmp_path: Path
) -> None:
    document = with_card()
    for key, value in changes.items():
        if value is None:
            del document["card"][key]
        else:
            document["card"][key] = value
    with pytest.raises(ConfigError) as raised:
        parse(document, tmp_path, env={**CARD_ENV, **(env or {})})
    assert str(raised.value).startswith(message), str(raised.value)
    assert STRIPE_KEY not in str(raised.value)
    for value in (env or {}).values():
        assert value not in str(raised.value)


ROUTE_CARD_ERRORS = [
    ({"card": "yes"}, "routes[1].card: must be true or false"),
    ({"card_spt": 1}, "routes[1].card_spt: must be true or false"),
    ({"card_invoice": "no"}, "routes[1].card_invoice: must be true or false"),
    ({"card_amount": 0}, "routes[1].card_amount: must be a positive integer"),
    ({"card_amount": 2.5}, "routes[1].card_amount: must be a positive integer"),
    ({"card": False, "card_amount": 25}, "routes[1].card_amount: only used with card = true"),
    ({"card_spt": False}, "routes[1].card: a card offer needs spt or invoice"),
    ({"price": "$0.001"}, "routes[1]: route POST /reports/{id}: price is finer than a cent"),
    ({"card_typo": True}, "routes[1].card_typo: unknown key"),
]


@pytest.mark.parametrize(("changes", "message"), ROUTE_CARD_ERRORS)
def test_each_route_card_mistake_names_its_key(
    changes: dict[str, Any], message: str, tmp_path: Path
) -> None:
    document = with_card()
    document["routes"][1].update(changes)
    with pytest.raises(ConfigError) as raised:
        parse(document, tmp_path, env=CARD_ENV)
    assert str(raised.value).startswith(message), str(raised.value)


def test_card_options_without_a_card_section(tmp_path: Path) -> None:
    for option, value in (("card", True), ("card_amount", 25), ("card", False)):
        document = valid()
        document["routes"][0][option] = value
        with pytest.raises(ConfigError, match=rf"^routes\[0\]\.{option}: card payments need"):
            parse(document, tmp_path, env=CARD_ENV)


def test_missing_stripe_key_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(with_card(), tmp_path, env={})
    assert str(raised.value) == (
        "card.secret_key_env: environment variable STRIPE_SECRET_KEY (the Stripe secret key) "
        "is not set"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning")
async def test_build_app_with_cards(
    chain: DevChain, tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")
    from farebox.cli.serve import serve_banner
    from farebox.ledgers.stripe import STRIPE_PREVIEW_VERSION
    from farebox.rails.card import CardRail

    document = with_card(
        api_base="http://127.0.0.1:9",
        lifetime=120,
        invoice_lifetime=600,
        require_client_secret=True,
    )
    document["routes"][1]["price"] = "$0.50"
    with caplog.at_level("WARNING", logger="farebox.server"):
        app = build_app(parse(document, tmp_path, env=CARD_ENV), chain=chain)
    assert "no challenge secret" in caplog.text
    rail = app.gate.card
    assert isinstance(rail, CardRail)
    assert (rail.lifetime, rail.invoice_lifetime) == (120, 600)
    assert rail.require_client_secret is True
    assert rail.ledger.stripe_version == STRIPE_PREVIEW_VERSION
    assert rail.ledger.spt_parameter == "top_level"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://api.test"
    ) as http:
        unpaid = await http.post("/reports/1")
        x402_only = await http.get("/weather")
    assert unpaid.status_code == 402
    card_lines = [v for k, v in unpaid.headers.multi_items() if k == "www-authenticate"]
    assert any('method="stripe"' in line for line in card_lines), card_lines
    assert not any(
        'method="stripe"' in v
        for k, v in x402_only.headers.multi_items()
        if k == "www-authenticate"
    )
    banner = serve_banner(app, "http://127.0.0.1:8402")
    assert "Card        stripe (profile_test_farebox)" in banner
    for text in (banner, caplog.text, repr(app.config), repr(rail)):
        assert STRIPE_KEY not in text
    await app.aclose()


def test_several_workers_need_a_card_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "farebox.toml"
    path.write_text(_toml(with_card()))
    monkeypatch.setenv("FAREBOX_CONFIG", str(path))
    monkeypatch.setenv("STRIPE_SECRET_KEY", STRIPE_KEY)
    monkeypatch.delenv("FAREBOX_CARD_SECRET", raising=False)
    monkeypatch.delenv("X402_FACILITATOR_URL", raising=False)
    with pytest.raises(ConfigError, match=r"^card.challenge_secret_env: required with several"):
        app_from_env()
