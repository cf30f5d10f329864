"""A paid API from a TOML file: the routes, their prices, who gets paid and how payments settle.

:func:`load_config` reads and validates the file into a frozen :class:`ServerConfig` (every mistake
is a :class:`~farebox.errors.ConfigError` naming its key, e.g. ``routes[2].price: ...``; unknown
keys are mistakes too, so a typo never passes silently). :func:`build_app` turns it into an ASGI
app: the gate in front of a reverse proxy to ``server.upstream``, or in front of a small built-in
app. The schema::

    [server]
    issuer = "https://api.example.com"  # optional: an https origin; else records are signed as
                                        #   the receipt key's did:key
    receipt_key = "receipts.key"        # optional Ed25519 key file; created (0600) if missing.
                                        #   Without it, a fresh key per start (needs no issuer).
    store = "payments.sqlite"           # required: a SQLite file, "memory", or a shared store's URL:
                                        # postgresql://... or redis://... (for many instances)
    upstream = "http://127.0.0.1:9000"  # optional: proxy every request to this URL
    upstream_timeout = 30               # optional, seconds (connect, and each wait for bytes)
    log_challenges = true               # optional: log each 402 challenge (it is counted anyway
                                        #   while true; false writes nothing for a 402)
    traffic_retention = 86400           # optional, seconds the reconciler keeps challenge,
                                        #   refusal and replay events (their daily counts stay)
    traffic_keep = 100000               # optional: at most this many of those events are kept

    [payment]
    network = "eip155:84532"            # CAIP-2, or "devchain" for the embedded chain
    asset = "0x036C..."                 # optional: the network's default USDC
    pay_to = "0x..."                    # required: the merchant's address
                                        # (addresses: all-lower or all-upper case hex, or with
                                        #   their exact EIP-55 checksum; a wrong one is an error)

    [settlement]                        # exactly one of ledger, rpc_url, facilitator
    ledger = "embedded"                 # the in-process chain (network "devchain"), settling
                                        #   with development account #1
    rpc_url = "https://sepolia.base.org"  # a node; with settler_key = "settler.key" (hex key
                                          #   file of the account paying the gas)
    facilitator = "https://x402.org/facilitator"  # an x402 facilitator; token_env optionally
                                                  #   names the variable holding its bearer token
                                                  #   (default: FAREBOX_FACILITATOR_TOKEN if set)
    timeout = 15                        # optional, seconds per call to the node or facilitator
    reconcile_rpc_url = "https://..."   # optional, with facilitator: a node to read the chain
                                        #   from, to resolve payments whose settlement was pending

    [[routes]]                          # one or more
    method = "GET"                      # optional, GET by default; "*" for any
    path = "/reports/{id}"              # {name} is one segment, {name:path} the rest
    price = "$0.01"                     # "$0.01", "0.01 USDC", or an int of atomic units
    description = "A report"            # optional
    mime_type = "application/json"      # optional
    max_timeout_seconds = 300           # optional
    content = '{"ok": true}'            # optional, without upstream: the paid body to serve
    card = true                         # optional, default false: also take cards ([card] needed)
    card_amount = 25                    # optional, minor units; default: derived from the USD price
    card_invoice = true                 # optional, default false: X-Receipt invoices
    card_spt = true                     # optional, default true: MPP Shared Payment Tokens

    [card]                              # optional: card payments through Stripe (farebox[stripe])
    network_id = "profile_..."          # required: the seller's Stripe profile (MPP networkId)
    realm = "api.example.com"           # optional; default: the issuer's host, else "farebox"
    currency = "usd"                    # optional
    minimum = 50                        # optional, minor units: below it no card method is offered
    secret_key_env = "STRIPE_SECRET_KEY"  # optional: the variable holding the Stripe secret key
                                          #   (never in the file); must be set
    challenge_secret_env = "FAREBOX_CARD_SECRET"  # optional: the variable with the challenge HMAC
                                          #   secret (hex, >= 32 bytes); required with several
                                          #   workers or instances; else FAREBOX_CARD_SECRET if
                                          #   set, else random per start (logged as a warning)
    api_base = "http://127.0.0.1:12111"  # optional: a Stripe-compatible API base; default Stripe's
    stripe_version = "..."              # optional, default farebox.ledgers.stripe's preview version
    spt_parameter = "top_level"         # optional: or "payment_method_data"
    lifetime = 300                      # optional, seconds a challenge may be answered
    invoice_lifetime = 900              # optional, seconds an X-Receipt invoice stays payable
    require_client_secret = false       # optional: accept only the client secret as an X-Receipt

Relative paths are resolved against the config file's folder. ``X402_FACILITATOR_URL`` (the x402
tools' variable) supplies the facilitator when ``[settlement]`` is absent and overrides a
configured ``facilitator``; it never replaces an explicit ``ledger`` or ``rpc_url`` (a stray
variable must not move settlement elsewhere). ``load_config(..., facilitator=URL)`` (the
``--facilitator`` option) overrides everything.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import orjson

from farebox._asgi import ASGIApp, Receive, Scope, Send, run_lifespan, send_response
from farebox.errors import ConfigError
from farebox.eth import EvmAccount, checked_address
from farebox.facilitator.base import Facilitator
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger, EvmReader
from farebox.ledgers.rpc import HttpRpc
from farebox.money import ASSETS, DEVCHAIN_USDC, Asset, AssetRegistry, parse_price
from farebox.ops.reconcile import (
    DEFAULT_TRAFFIC_KEEP,
    DEFAULT_TRAFFIC_RETENTION,
    ChainReader,
    Reconciler,
    release_after_for,
)
from farebox.receipts.keys import SigningKey, https_origin, load_signing_key, save_signing_key
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.proxy import ReverseProxy
from farebox.server.routes import CardOffer, Route, RouteTable
from farebox.store.base import Store
from farebox.store.memory import MemoryStore
from farebox.store.sqlite import SqliteStore

if TYPE_CHECKING:
    import stripe
    from farebox.ledgers.devchain import DevChain
    from farebox.ledgers.stripe import StripeLedger
    from farebox.rails.card import CardRail

__all__ = [
    "CARD_SECRET_ENV",
    "CONFIG_ENV",
    "FACILITATOR_ENV",
    "FACILITATOR_TOKEN_ENV",
    "STRIPE_KEY_ENV",
    "CardConfig",
    "EmbeddedSettlement",
    "FacilitatorSettlement",
    "FareboxApp",
    "RouteConfig",
    "RpcSettlement",
    "ServerConfig",
    "Settlement",
    "app_from_env",
    "build_app",
    "card_ledger",
    "load_config",
    "open_store",
    "parse_config",
]

FACILITATOR_ENV = "X402_FACILITATOR_URL"
# The remote facilitator client's own default for its bearer token (a variable name, not a secret).
FACILITATOR_TOKEN_ENV = "FAREBOX_FACILITATOR_TOKEN"  # noqa: S105
# Variable names, not secrets.
STRIPE_KEY_ENV = "STRIPE_SECRET_KEY"
CARD_SECRET_ENV = "FAREBOX_CARD_SECRET"  # noqa: S105
DEVCHAIN_ALIAS = "devchain"
# Development account #1 of the embedded chain pays the gas, as in the sample API.
EMBEDDED_SETTLER = 1

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"})
_MIN_CARD_SECRET = 32
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

logger = logging.getLogger("farebox.server")


# --- the validated configuration ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmbeddedSettlement:
    """Settle on an in-process :class:`~farebox.ledgers.devchain.DevChain`."""


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
class CardConfig:
    """The ``[card]`` section: card payments through Stripe.

    ``secret_key`` is the Stripe secret key read from the variable ``secret_key_env`` names;
    ``challenge_secret`` the challenge HMAC secret (``None``: random per start). Neither appears in
    the repr. ``stripe_version`` ``None`` is the ledger's pinned preview version; ``api_base``
    ``None`` is Stripe's own API.
    """

    network_id: str
    realm: str
    secret_key: str = field(repr=False)
    secret_key_env: str = STRIPE_KEY_ENV
    challenge_secret: bytes | None = field(default=None, repr=False)
    challenge_secret_env: str | None = None
    currency: str = "usd"
    minimum: int = 50
    api_base: str | None = None
    stripe_version: str | None = None
    spt_parameter: str = "top_level"
    lifetime: float = 300.0
    invoice_lifetime: float = 900.0
    require_client_secret: bool = False


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


def _card(
    document: Mapping[str, Any], issuer: str | None, env: Mapping[str, str]
) -> CardConfig | None:
    if "card" not in document:
        return None
    table = _table(document, "card", required=True)
    _only(
        table,
        "card",
        {
            "network_id",
            "realm",
            "currency",
            "minimum",
            "secret_key_env",
            "challenge_secret_env",
            "api_base",
            "stripe_version",
            "spt_parameter",
            "lifetime",
            "invoice_lifetime",
            "require_client_secret",
        },
    )
    network_id = _string(table, "card.network_id", "network_id")
    if network_id is None:
        raise ConfigError('card.network_id: required: the seller\'s Stripe profile ("profile_...")')
    realm = _string(table, "card.realm", "realm")
    if realm is None:
        realm = (urlsplit(issuer).hostname if issuer else None) or "farebox"
    currency = (_string(table, "card.currency", "currency") or "usd").lower()
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise ConfigError(f"card.currency: {currency!r} is not a three-letter ISO 4217 code")
    minimum = table.get("minimum", 50)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise ConfigError("card.minimum: must be a non-negative integer of minor units")
    key_env = _env_name(table, "card.secret_key_env", "secret_key_env") or STRIPE_KEY_ENV
    secret_key = env.get(key_env)
    if not secret_key:
        # Name the variable, never a value.
        raise ConfigError(
            f"card.secret_key_env: environment variable {key_env} (the Stripe secret key) is not set"
        )
    secret_env = _env_name(table, "card.challenge_secret_env", "challenge_secret_env")
    challenge_secret: bytes | None = None
    if secret_env is not None or env.get(CARD_SECRET_ENV):
        name = secret_env or CARD_SECRET_ENV
        text = env.get(name)
        if not text:
            raise ConfigError(f"card.challenge_secret_env: environment variable {name} is not set")
        try:
            challenge_secret = bytes.fromhex(text.strip())
        except ValueError:
            raise ConfigError(
                f"card.challenge_secret_env: {name} must hold hex (e.g. openssl rand -hex 32)"
            ) from None
        if len(challenge_secret) < _MIN_CARD_SECRET:
            raise ConfigError(
                f"card.challenge_secret_env: {name} must hold at least {_MIN_CARD_SECRET} bytes "
                f"({2 * _MIN_CARD_SECRET} hex digits)"
            )
        secret_env = name
    api_base = _string(table, "card.api_base", "api_base")
    if api_base is not None:
        _check_url(api_base, "card.api_base")
        parts = urlsplit(api_base)
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError("card.api_base: must be a bare http(s) base URL")
        api_base = api_base.rstrip("/")
    stripe_version = _string(table, "card.stripe_version", "stripe_version")
    spt_parameter = _string(table, "card.spt_parameter", "spt_parameter") or "top_level"
    if spt_parameter not in ("top_level", "payment_method_data"):
        raise ConfigError(
            f'card.spt_parameter: {spt_parameter!r} is not "top_level" or "payment_method_data"'
        )
    lifetime = _card_seconds(table, "lifetime", 300, 86_400)
    invoice_lifetime = _card_seconds(table, "invoice_lifetime", 900, 7 * 86_400)
    require_secret = table.get("require_client_secret", False)
    if not isinstance(require_secret, bool):
        raise ConfigError("card.require_client_secret: must be true or false")
    return CardConfig(
        network_id=network_id,
        realm=realm,
        secret_key=secret_key,
        secret_key_env=key_env,
        challenge_secret=challenge_secret,
        challenge_secret_env=secret_env,
        currency=currency,
        minimum=minimum,
        api_base=api_base,
        stripe_version=stripe_version,
        spt_parameter=spt_parameter,
        lifetime=lifetime,
        invoice_lifetime=invoice_lifetime,
        require_client_secret=require_secret,
    )


def _env_name(table: Mapping[str, Any], where: str, key: str) -> str | None:
    name = _string(table, where, key)
    if name is not None and not _ENV_NAME.fullmatch(name):
        # Someone pasted the secret itself here: do not repeat it.
        raise ConfigError(f"{where}: must name an environment variable (letters, digits, _)")
    return name


def _card_seconds(table: Mapping[str, Any], key: str, default: float, most: int) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"card.{key}: must be a number of seconds")
    if not (math.isfinite(value) and 0 < value <= most):
        raise ConfigError(f"card.{key}: must be more than 0 and at most {most} seconds")
    return float(value)


def _card_offer(item: Mapping[str, Any], where: str, card: CardConfig | None) -> CardOffer | None:
    options = ("card", "card_amount", "card_invoice", "card_spt")
    wanted = item.get("card", False)
    if not isinstance(wanted, bool):
        raise ConfigError(f"{where}.card: must be true or false")
    for option in ("card_invoice", "card_spt"):
        if option in item and not isinstance(item[option], bool):
            raise ConfigError(f"{where}.{option}: must be true or false")
    amount = item.get("card_amount")
    if amount is not None and (
        isinstance(amount, bool) or not isinstance(amount, int) or amount < 1
    ):
        raise ConfigError(f"{where}.card_amount: must be a positive integer of minor units")
    used = [option for option in options if option in item]
    if used and card is None:
        raise ConfigError(f"{where}.{used[0]}: card payments need a [card] section")
    if not wanted:
        extra = [option for option in used if option != "card"]
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: only used with card = true")
        return None
    assert card is not None
    try:
        return CardOffer(
            network_id=card.network_id,
            realm=card.realm,
            currency=card.currency,
            amount=amount,
            minimum=card.minimum,
            spt=item.get("card_spt", True),
            invoice=item.get("card_invoice", False),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}.card: {exc}") from None


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


# --- small readers: each names the key it reads ------------------------------------------------


def _only(table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})"
        )


def _table(document: Mapping[str, Any], key: str, *, required: bool) -> Mapping[str, Any]:
    value = document.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{key}: the [{key}] table is required")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table ([{key}])")
    return value


def _string(table: Mapping[str, Any], where: str, key: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ConfigError(f"{where}: must not be empty")
    return value


def _count(table: Mapping[str, Any], where: str, key: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
        raise ConfigError(f"{where}: must be a whole number, 0 or more")
    return value


def _seconds(table: Mapping[str, Any], where: str, key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: must be a number of seconds")
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise ConfigError(f"{where}: must be more than 0 and at most 3600 seconds")
    return float(value)


def _resolve(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _path(table: Mapping[str, Any], where: str, key: str, base: Path) -> Path | None:
    text = _string(table, where, key)
    return None if text is None else _resolve(text, base)


def _check_url(url: str, where: str, *, show: bool = True) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        # A node URL may embed an API key: name the key, not the value.
        shown = f" {url!r}" if show else ""
        raise ConfigError(f"{where}:{shown} is not an http(s) URL")


# --- building ----------------------------------------------------------------------------------


def build_app(config: ServerConfig, *, chain: DevChain | None = None) -> FareboxApp:
    """The ASGI app for ``config``: keys loaded (a missing receipt key file is created), store
    opened lazily, ledger or facilitator connected lazily.

    ``chain`` is the embedded chain to settle on (a new one by default); it is ignored by the other
    settlement modes.
    """
    signing_key, created = _signing_key(config.receipt_key)
    settlement = config.settlement
    facilitator: Facilitator
    used_chain: DevChain | None = None
    if isinstance(settlement, EmbeddedSettlement):
        if chain is None:
            try:
                from farebox.ledgers.devchain import DevChain
            except ModuleNotFoundError as exc:
                raise ConfigError(
                    f"settlement.ledger: the embedded chain needs {exc.name}: "
                    "pip install 'farebox[devchain]'"
                ) from None
            chain = DevChain()
        used_chain = chain
        settler = chain.accounts[EMBEDDED_SETTLER].account
        facilitator = LocalFacilitator([EvmLedger(chain.rpc, settler, network=chain.network)])
    elif isinstance(settlement, RpcSettlement):
        try:
            settler = EvmAccount.from_file(settlement.settler_key)
        except ConfigError as exc:
            raise ConfigError(f"settlement.settler_key: {exc}") from None
        rpc = HttpRpc(settlement.rpc_url, timeout=settlement.timeout)
        facilitator = LocalFacilitator([EvmLedger(rpc, settler, network=config.network)])
    else:
        facilitator = _remote_facilitator(settlement)
    card_rail: CardRail | None = None
    card_http: stripe.HTTPXClient | None = None
    if config.card is not None:
        ledger, card_http = card_ledger(config.card)
        card_rail = _card_rail(config.card, ledger)
    store = _open_store(config.store)
    gate = Gate(
        config.route_table(),
        facilitator,
        store,
        signing_key=signing_key,
        issuer=config.issuer,
        card=card_rail,
        log_challenges=config.log_challenges,
    )
    proxy = None
    inner: ASGIApp
    if config.upstream is not None:
        proxy = ReverseProxy(config.upstream, timeout=config.upstream_timeout, routes=gate.routes)
        inner = proxy
    else:
        inner = _BuiltinApp(config.routes)
    return FareboxApp(
        config,
        gate,
        PaymentMiddleware(inner, gate),
        proxy,
        used_chain,
        created,
        card_http=card_http,
    )


def card_ledger(card: CardConfig) -> tuple[StripeLedger, stripe.HTTPXClient]:
    """A :class:`~farebox.ledgers.stripe.StripeLedger` for ``[card]`` and its HTTP client (close it
    with ``await client.close_async()``). The client is httpx-based, so the ledger's async calls
    never block the event loop, and makes no retries of its own (see the ledger)."""
    try:
        from farebox.ledgers.stripe import (
            STRIPE_PREVIEW_VERSION,
            SptPlacement,
            StripeLedger,
            stripe_client,
        )
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"card: card payments need {exc.name}: pip install 'farebox[stripe]'"
        ) from None
    client, http_client = stripe_client(card.secret_key, api_base=card.api_base)
    placement = cast("SptPlacement", card.spt_parameter)
    ledger = StripeLedger(
        client,
        stripe_version=card.stripe_version or STRIPE_PREVIEW_VERSION,
        spt_parameter=placement,
    )
    return ledger, http_client


def _card_rail(card: CardConfig, ledger: StripeLedger) -> CardRail:
    from farebox.rails.card import CardRail

    secret = card.challenge_secret
    if secret is None:
        logger.warning(
            "card: no challenge secret (%s): a random one for this process; card challenges "
            "issued by other processes or before a restart will be refused",
            CARD_SECRET_ENV,
        )
        secret = os.urandom(_MIN_CARD_SECRET)
    return CardRail(
        secret,
        ledger,
        lifetime=card.lifetime,
        invoice_lifetime=card.invoice_lifetime,
        require_client_secret=card.require_client_secret,
    )


def open_store(config: ServerConfig) -> Store:
    """The store ``server.store`` names (opened on first use); a memory store for ``"memory"``."""
    return _open_store(config.store)


def _signing_key(path: Path | None) -> tuple[SigningKey, bool]:
    if path is None:
        return SigningKey.generate(), False
    if not path.exists():
        key = SigningKey.generate()
        try:
            save_signing_key(key, path)
            return key, True
        except ConfigError as exc:
            if not path.exists():  # else another process created it first: read theirs
                raise ConfigError(f"server.receipt_key: {exc}") from None
    try:
        return load_signing_key(path), False
    except ConfigError as exc:
        raise ConfigError(f"server.receipt_key: {exc}") from None


def _remote_facilitator(settlement: FacilitatorSettlement) -> Facilitator:
    # Imported by name when needed, so this module works on installs without the remote client.
    try:
        module = importlib.import_module("farebox.facilitator.remote")
    except ModuleNotFoundError:
        raise ConfigError(
            "settlement.facilitator: this farebox has no remote facilitator client"
        ) from None
    facilitator: Facilitator = module.RemoteFacilitator(
        settlement.url, timeout=settlement.timeout, token=settlement.token
    )
    return facilitator


# URL schemes of the stores many server instances can share.
_SHARED_STORES = {
    "postgresql": "postgres",
    "postgres": "postgres",
    "redis": "redis",
    "rediss": "redis",
}


def _open_store(store: Path | str | None) -> Store:
    if store is None:
        return MemoryStore()
    if isinstance(store, Path):
        return SqliteStore(store)
    # Imported only when configured: psycopg and redis are optional extras.
    kind = _SHARED_STORES[urlsplit(store).scheme]
    try:
        if kind == "postgres":
            from farebox.store.postgres import PostgresStore

            return PostgresStore(store)
        from farebox.store.redis import RedisStore

        return RedisStore(store)
    except ImportError as exc:
        raise ConfigError(
            f"server.store: a {kind} store needs {exc.name}: pip install 'farebox[{kind}]'"
        ) from None


#: The config file a worker process builds its app from (``farebox serve --workers N``).
CONFIG_ENV = "FAREBOX_CONFIG"


def app_from_env() -> FareboxApp:
    """The app of the config named by ``$FAREBOX_CONFIG``: the factory each worker of
    ``farebox serve --workers N`` (or ``uvicorn --factory``) calls in its own process."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_ENV} names no config file")
    config = load_config(Path(path))
    if config.card is not None and config.card.challenge_secret is None:
        # Each worker would make up its own secret and refuse the others' challenges.
        raise ConfigError(
            f"card.challenge_secret_env: required with several workers (set {CARD_SECRET_ENV} "
            "to 64 hex digits, the same for every worker)"
        )
    return build_app(config)


class FareboxApp:
    """The configured server as an ASGI app. Its resources (store, node or facilitator
    connections, the proxy's pool) close on the lifespan shutdown, or with :meth:`aclose`."""

    def __init__(
        self,
        config: ServerConfig,
        gate: Gate,
        app: PaymentMiddleware,
        proxy: ReverseProxy | None,
        chain: DevChain | None,
        receipt_key_created: bool,
        *,
        card_http: stripe.HTTPXClient | None = None,
    ) -> None:
        self.config = config
        self.gate = gate
        self.proxy = proxy
        self.chain = chain
        """The embedded chain, with ``ledger = "embedded"``."""
        self.receipt_key_created = receipt_key_created
        """Whether this start created the receipt key file."""
        self._app = app
        self._card_http = card_http
        self._closed = False
        self._reconciler: Reconciler | None = None
        self._reader_rpc: HttpRpc | None = None

    @property
    def reconciler(self) -> Reconciler:
        """The reconciler of this server: it resolves unfinished payments from the chain it can
        read (its ledger's, or ``reconcile_rpc_url`` with a facilitator; with neither, pending
        payments wait for ``farebox reconcile --settled/--release``) and prunes old traffic."""
        if self._reconciler is None:
            config = self.config
            longest = max(r.route.max_timeout_seconds for r in config.routes)
            self._reconciler = Reconciler(
                self.gate.store,
                self._readers(),
                release_after=release_after_for(longest),
                traffic_retention=config.traffic_retention,
                traffic_keep=config.traffic_keep,
            )
        return self._reconciler

    def _readers(self) -> list[ChainReader]:
        facilitator = self.gate.facilitator
        if isinstance(facilitator, LocalFacilitator):
            return list(facilitator.ledgers)
        settlement = self.config.settlement
        if isinstance(settlement, FacilitatorSettlement) and settlement.reconcile_rpc_url:
            rpc = HttpRpc(settlement.reconcile_rpc_url, timeout=settlement.timeout)
            self._reader_rpc = rpc
            return [EvmReader(rpc, network=self.config.network)]
        return []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self._app(scope, receive, send)
            return
        reconciler = self.reconciler

        async def reconcile() -> None:
            await reconciler.run_forever(interval=30.0)

        await run_lifespan(receive, send, self.aclose, background=reconcile)

    async def aclose(self) -> None:
        """Close the gate (store, facilitator) and the proxy's pool; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.gate.aclose()
        finally:
            try:
                if self.proxy is not None:
                    await self.proxy.aclose()
            finally:
                if self._card_http is not None:
                    await self._card_http.close_async()  # type: ignore[no-untyped-call]
                if self._reader_rpc is not None:
                    await self._reader_rpc.aclose()


class _BuiltinApp:
    """What answers behind the gate without an upstream: a route's ``content`` (or a small JSON
    note naming the route), a free ``GET /health``, and a 404 for everything else."""

    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self._table = RouteTable(entry.route for entry in routes)
        self._content = {entry.route.name: entry for entry in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        found = self._table.match(method, path)
        if found is not None:
            entry = self._content[found.route.name]
            if entry.content is not None:
                mime = entry.route.mime_type or "text/plain; charset=utf-8"
                await _answer(send, 200, mime, entry.content.encode(), method)
                return
            note = {"route": found.route.name, "path": path, "params": dict(found.params)}
            await _answer(send, 200, "application/json", orjson.dumps(note), method)
        elif path == "/health" and method in ("GET", "HEAD"):
            await _answer(send, 200, "application/json", b'{"ok":true}', method)
        else:
            problem = {"type": "about:blank", "title": "Not Found", "status": 404}
            await _answer(send, 404, "application/problem+json", orjson.dumps(problem), method)


async def _answer(send: Send, status: int, content_type: str, body: bytes, method: str) -> None:
    headers = [(b"content-type", content_type.encode("latin-1"))]
    await send_response(send, status, body, headers, head=method == "HEAD")
