"""The TOML schema (documented in :mod:`farebox.config`): the validated configuration's types,
and reading a file into them. Every mistake is a :class:`~farebox.errors.ConfigError` naming its
key (``routes[2].price: ...``); unknown keys are mistakes too, so a typo never passes silently.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from farebox.config._read import (
    _check_url,
    _count,
    _only,
    _path,
    _resolve,
    _seconds,
    _string,
    _table,
)
from farebox.config.card import CardConfig, _card, _card_offer
from farebox.errors import ConfigError
from farebox.eth import checked_address
from farebox.money import ASSETS, DEVCHAIN_USDC, Asset, AssetRegistry, parse_price
from farebox.ops.reconcile import DEFAULT_TRAFFIC_KEEP, DEFAULT_TRAFFIC_RETENTION
from farebox.receipts.keys import https_origin
from farebox.server.routes import Route, RouteTable

FACILITATOR_ENV = "X402_FACILITATOR_URL"
# The remote facilitator client's own default for its bearer token (a variable name, not a secret).
FACILITATOR_TOKEN_ENV = "FAREBOX_FACILITATOR_TOKEN"  # noqa: S105
DEVCHAIN_ALIAS = "devchain"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"})
# URL schemes of the stores many server instances can share.
_SHARED_STORES = {
    "postgresql": "postgres",
    "postgres": "postgres",
    "redis": "redis",
    "rediss": "redis",
}


# --- the validated configuration ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmbeddedSettlement:
    """Settle on an in-process :class:`~farebox.dev.devchain.DevChain`."""


@dataclass(frozen=True, slots=True)
class RpcSettlement:
    """Settle through a node's JSON-RPC with the account in ``settler_key`` paying the gas."""

    rpc_url: str = field(repr=False)  # URLs of hosted nodes often embed an API key
    settler_key: Path
    timeout: float = 15.0


@dataclass(frozen=True, slots=True)
class FacilitatorSettlement:
    """Verify and settle through a remote x402 facilitator. ``source`` says who chose the URL:
    ``"config"``, ``"env"`` (``X402_FACILITATOR_URL``) or ``"override"`` (``--facilitator``)."""

    url: str
    source: str = "config"
    token: str | None = field(default=None, repr=False)
    timeout: float = 15.0
    #: A node to read the chain from when reconciling (never to send).
    reconcile_rpc_url: str | None = field(default=None, repr=False)


Settlement = EmbeddedSettlement | RpcSettlement | FacilitatorSettlement


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A validated paid route and, without an upstream, the body the built-in app serves for it."""

    route: Route
    content: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """A validated server configuration. ``store`` is ``None`` for the in-memory store;
    ``receipt_key`` is ``None`` for a fresh key at each start."""

    asset: Asset
    pay_to: str
    settlement: Settlement
    routes: tuple[RouteConfig, ...]
    store: Path | str | None
    issuer: str | None = None
    receipt_key: Path | None = None
    upstream: str | None = None
    upstream_timeout: float = 30.0
    log_challenges: bool = True
    traffic_retention: int = DEFAULT_TRAFFIC_RETENTION
    traffic_keep: int = DEFAULT_TRAFFIC_KEEP
    source: Path | None = None
    card: CardConfig | None = None

    @property
    def network(self) -> str:
        """The CAIP-2 network payments are made on."""
        return self.asset.network

    def route_table(self) -> RouteTable:
        """A fresh :class:`RouteTable` of the configured routes, in file order."""
        return RouteTable(entry.route for entry in self.routes)


# --- reading -----------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    facilitator: str | None = None,
    assets: AssetRegistry = ASSETS,
) -> ServerConfig:
    """Read and validate the TOML file at ``path``.

    ``env`` is the environment to read ``X402_FACILITATOR_URL`` (and a facilitator token) from,
    ``os.environ`` by default; ``facilitator`` overrides the settlement with that facilitator URL.
    """
    source = Path(path)
    try:
        with source.open("rb") as fh:
            document = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_config(
        document,
        base_dir=source.resolve().parent,
        env=env,
        facilitator=facilitator,
        assets=assets,
        source=source,
    )


def parse_config(
    document: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    facilitator: str | None = None,
    assets: AssetRegistry = ASSETS,
    source: Path | None = None,
) -> ServerConfig:
    """Validate a parsed TOML document; relative paths resolve against ``base_dir``."""
    env = os.environ if env is None else env
    base = Path(base_dir)
    _only(document, "", {"server", "payment", "settlement", "routes", "card"})
    server = _table(document, "server", required=False)
    payment = _table(document, "payment", required=True)
    _only(
        server,
        "server",
        {
            "issuer",
            "receipt_key",
            "store",
            "upstream",
            "upstream_timeout",
            "log_challenges",
            "traffic_retention",
            "traffic_keep",
        },
    )
    _only(payment, "payment", {"network", "asset", "pay_to"})

    issuer = _string(server, "server.issuer", "issuer")
    if issuer is not None and https_origin(issuer) != issuer:
        raise ConfigError(
            f"server.issuer: {issuer!r} is not an https origin such as https://api.example.com "
            "(omit it to sign records as the receipt key's did:key)"
        )
    receipt_key = _path(server, "server.receipt_key", "receipt_key", base)
    if issuer is not None and receipt_key is None:
        raise ConfigError(
            "server.receipt_key: required with server.issuer (an https issuer publishes its keys, "
            "so they must survive a restart)"
        )
    store_text = _string(server, "server.store", "store")
    if store_text is None:
        raise ConfigError(
            'server.store: required: a SQLite file path, "memory", or a postgresql:// or '
            "redis:// URL"
        )
    store: Path | str | None
    if store_text == "memory":
        store = None
    elif urlsplit(store_text).scheme in _SHARED_STORES:
        store = store_text
    else:
        store = _resolve(store_text, base)
    upstream = _string(server, "server.upstream", "upstream")
    if upstream is not None:
        _check_url(upstream, "server.upstream")
        if urlsplit(upstream).query or urlsplit(upstream).fragment:
            raise ConfigError("server.upstream: must not have a query or fragment")
    upstream_timeout = _seconds(server, "server.upstream_timeout", "upstream_timeout", 30.0)
    log_challenges = server.get("log_challenges", True)
    if not isinstance(log_challenges, bool):
        raise ConfigError("server.log_challenges: must be true or false")
    traffic_retention = _count(
        server, "server.traffic_retention", "traffic_retention", DEFAULT_TRAFFIC_RETENTION
    )
    traffic_keep = _count(server, "server.traffic_keep", "traffic_keep", DEFAULT_TRAFFIC_KEEP)

    network = _string(payment, "payment.network", "network")
    if network is None:
        raise ConfigError('payment.network: required: a CAIP-2 network such as "eip155:84532"')
    if network == DEVCHAIN_ALIAS:
        network = DEVCHAIN_USDC.network
    asset_address = _string(payment, "payment.asset", "asset")
    asset = _asset(network, asset_address, assets)
    pay_to = _string(payment, "payment.pay_to", "pay_to")
    if pay_to is None:
        raise ConfigError("payment.pay_to: required: the address that receives the payments")
    pay_to = checked_address(pay_to, "payment.pay_to")

    settlement = _settlement(document, asset, base, env, facilitator)
    card = _card(document, issuer, env)
    routes = _routes(document, asset, pay_to, upstream is not None, card)
    return ServerConfig(
        asset=asset,
        pay_to=pay_to,
        settlement=settlement,
        routes=routes,
        store=store,
        issuer=issuer,
        receipt_key=receipt_key,
        upstream=upstream,
        upstream_timeout=upstream_timeout,
        log_challenges=log_challenges,
        traffic_retention=traffic_retention,
        traffic_keep=traffic_keep,
        source=source,
        card=card,
    )


def _asset(network: str, address: str | None, assets: AssetRegistry) -> Asset:
    if address is None:
        try:
            return assets.default_for(network)
        except ConfigError:
            raise ConfigError(
                f"payment.network: no known asset on {network!r}; "
                f'use "devchain" or one of {sorted({a.network for a in assets})}'
            ) from None
    address = checked_address(address, "payment.asset")
    found = assets.find(network, address)
    if found is None:
        known = [a.address for a in assets if a.network == network]
        raise ConfigError(
            f"payment.asset: {address} is not a known asset on {network} (known: {known or 'none'})"
        )
    return found


def _settlement(
    document: Mapping[str, Any],
    asset: Asset,
    base: Path,
    env: Mapping[str, str],
    override: str | None,
) -> Settlement:
    table = _table(document, "settlement", required=False)
    _only(
        table,
        "settlement",
        {
            "ledger",
            "rpc_url",
            "settler_key",
            "facilitator",
            "token_env",
            "timeout",
            "reconcile_rpc_url",
        },
    )
    timeout = _seconds(table, "settlement.timeout", "timeout", 15.0)
    ledger = _string(table, "settlement.ledger", "ledger")
    rpc_url = _string(table, "settlement.rpc_url", "rpc_url")
    url = _string(table, "settlement.facilitator", "facilitator")
    settler_key = _path(table, "settlement.settler_key", "settler_key", base)
    token_env = _string(table, "settlement.token_env", "token_env")
    reader_url = _string(table, "settlement.reconcile_rpc_url", "reconcile_rpc_url")
    if reader_url is not None:
        _check_url(reader_url, "settlement.reconcile_rpc_url", show=False)
    modes = (("ledger", ledger), ("rpc_url", rpc_url), ("facilitator", url))
    chosen = [key for key, value in modes if value is not None]
    if len(chosen) > 1:
        raise ConfigError(
            f"settlement: choose one of ledger, rpc_url, facilitator (got {', '.join(chosen)})"
        )
    if settler_key is not None and rpc_url is None:
        raise ConfigError("settlement.settler_key: only used with settlement.rpc_url")
    if ledger is not None and ledger != "embedded":
        raise ConfigError(f'settlement.ledger: {ledger!r} is unknown; the one ledger is "embedded"')
    if rpc_url is not None:
        _check_url(rpc_url, "settlement.rpc_url", show=False)
        if settler_key is None:
            raise ConfigError("settlement.settler_key: required with settlement.rpc_url")
    if url is not None:
        _check_url(url, "settlement.facilitator")

    # Which facilitator URL wins: --facilitator, then the environment (unless the file chose a
    # ledger of its own), then the file.
    from_env = env.get(FACILITATOR_ENV) or None
    remote: FacilitatorSettlement | None = None
    if override is not None:
        _check_url(override, "--facilitator")
        remote = FacilitatorSettlement(override, "override", timeout=timeout)
    elif from_env is not None and ledger is None and rpc_url is None:
        _check_url(from_env, FACILITATOR_ENV)
        remote = FacilitatorSettlement(from_env, "env", timeout=timeout)
    elif url is not None:
        remote = FacilitatorSettlement(url, "config", timeout=timeout)
    if remote is None:
        if token_env is not None:
            raise ConfigError("settlement.token_env: only used with a facilitator")
        if reader_url is not None:
            raise ConfigError(
                "settlement.reconcile_rpc_url: only used with a facilitator (a ledger of its own "
                "is read already)"
            )
        if rpc_url is not None and settler_key is not None:
            return RpcSettlement(rpc_url, settler_key, timeout)
        if ledger is None:
            raise ConfigError(
                f"settlement: required: ledger, rpc_url or facilitator (or set {FACILITATOR_ENV})"
            )
        if asset.network != DEVCHAIN_USDC.network:
            raise ConfigError(
                'settlement.ledger: "embedded" settles only on the embedded chain: '
                'set payment.network = "devchain"'
            )
        return EmbeddedSettlement()
    remote = replace(remote, reconcile_rpc_url=reader_url)
    if token_env is not None:
        # The file names the variable; the secret itself never sits in the file.
        token = env.get(token_env)
        if not token:
            raise ConfigError(f"settlement.token_env: environment variable {token_env} is not set")
        remote = replace(remote, token=token)
    elif env.get(FACILITATOR_TOKEN_ENV):
        remote = replace(remote, token=env[FACILITATOR_TOKEN_ENV])
    return remote


def _routes(
    document: Mapping[str, Any],
    asset: Asset,
    pay_to: str,
    proxied: bool,
    card: CardConfig | None = None,
) -> tuple[RouteConfig, ...]:
    raw = document.get("routes")
    if raw is None:
        raise ConfigError("routes: at least one [[routes]] table is required")
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError("routes: must be an array of tables ([[routes]])")
    if not raw:
        raise ConfigError("routes: at least one [[routes]] table is required")
    out: list[RouteConfig] = []
    seen: dict[tuple[str, str], int] = {}
    allowed = {
        "method",
        "path",
        "price",
        "description",
        "mime_type",
        "max_timeout_seconds",
        "content",
        "card",
        "card_amount",
        "card_invoice",
        "card_spt",
    }
    for index, item in enumerate(raw):
        where = f"routes[{index}]"
        _only(item, where, allowed)
        method = (_string(item, f"{where}.method", "method") or "GET").upper()
        if method not in _METHODS:
            raise ConfigError(f"{where}.method: {method!r} is not one of {sorted(_METHODS)}")
        path = _string(item, f"{where}.path", "path")
        if path is None:
            raise ConfigError(f'{where}.path: required, e.g. "/weather"')
        if not path.startswith("/"):
            raise ConfigError(f"{where}.path: {path!r} must start with '/'")
        if (method, path) in seen:
            raise ConfigError(f"{where}: {method} {path} is already routes[{seen[(method, path)]}]")
        seen[(method, path)] = index
        price = item.get("price")
        if price is None:
            raise ConfigError(f'{where}.price: required, e.g. "$0.01"')
        if isinstance(price, float):
            raise ConfigError(
                f'{where}.price: write it as a string ("$0.01"): floats are not exact'
            )
        if isinstance(price, bool) or not isinstance(price, (str, int)):
            raise ConfigError(f"{where}.price: must be a string or an integer of atomic units")
        try:
            parse_price(price, asset)
        except ConfigError as exc:
            raise ConfigError(f"{where}.price: {exc}") from None
        description = _string(item, f"{where}.description", "description") or ""
        mime_type = _string(item, f"{where}.mime_type", "mime_type") or ""
        max_timeout = item.get("max_timeout_seconds", 300)
        if isinstance(max_timeout, bool) or not isinstance(max_timeout, int):
            raise ConfigError(f"{where}.max_timeout_seconds: must be an integer")
        if not 6 < max_timeout <= 86_400:
            raise ConfigError(f"{where}.max_timeout_seconds: must be between 7 and 86400")
        content = _string(item, f"{where}.content", "content")
        if content is not None and proxied:
            raise ConfigError(
                f"{where}.content: not used with server.upstream (the upstream answers)"
            )
        offer = _card_offer(item, where, card)
        try:
            route = Route(
                method,
                path,
                price,
                (asset,),
                pay_to,
                description,
                mime_type,
                max_timeout,
                card=offer,
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        out.append(RouteConfig(route, content))
    return tuple(out)
