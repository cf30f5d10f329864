"""Objects from a checked :class:`~farebox.config.schema.ServerConfig`: the receipt key, the store,
the ledger or facilitator, the card rail, the gate, and the ASGI app serving them
(:class:`FareboxApp`: the gate in front of a reverse proxy to ``server.upstream``, or in front of a
small built-in app).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import orjson

from farebox._asgi import ASGIApp, Receive, Scope, Send, run_lifespan, send_response
from farebox.config.card import _MIN_CARD_SECRET, CARD_SECRET_ENV, CardConfig
from farebox.config.schema import (
    _SHARED_STORES,
    EmbeddedSettlement,
    FacilitatorSettlement,
    RouteConfig,
    RpcSettlement,
    ServerConfig,
    load_config,
)
from farebox.errors import ConfigError
from farebox.eth import EvmAccount
from farebox.facilitator.base import Facilitator
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger, EvmReader
from farebox.ledgers.rpc import HttpRpc
from farebox.ops.reconcile import ChainReader, Reconciler, release_after_for
from farebox.receipts.keys import SigningKey, load_signing_key, save_signing_key
from farebox.server.asgi import PaymentMiddleware
from farebox.server.gate import Gate
from farebox.server.proxy import ReverseProxy
from farebox.server.routes import RouteTable
from farebox.store.base import Store
from farebox.store.memory import MemoryStore
from farebox.store.sqlite import SqliteStore

if TYPE_CHECKING:
    import stripe
    from farebox.dev.devchain import DevChain
    from farebox.ledgers.stripe import StripeLedger
    from farebox.rails.card import CardRail

# Development account #1 of the embedded chain pays the gas, as in the sample API.
EMBEDDED_SETTLER = 1

logger = logging.getLogger("farebox.server")


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
                from farebox.dev.devchain import DevChain
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
