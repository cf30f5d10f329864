"""``farebox serve CONFIG``: run the paid API (or paid reverse proxy) a TOML file describes.

The server's modules are imported when the command runs, so that the other commands never load
them. The summary printed at start names routes, prices, network, asset, payee, settlement and issuer,
and never a key: key files are named by path and the receipt key by its public kid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import typer

from farebox.errors import ConfigError

if TYPE_CHECKING:  # the CLI starts without loading the server
    from farebox.config import FareboxApp

__all__ = ["serve_banner", "serve_command"]


def _shown(url: str) -> str:
    # Hosted nodes and facilitators put API keys in the path, the query or the userinfo: show
    # where it goes, not how it authenticates.
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def serve_banner(app: FareboxApp, url: str) -> str:
    """What ``farebox serve`` prints when it starts."""
    from farebox.server.routes import RequestInfo

    # Config prices are fixed and do not look at the request: this stands in for one.
    no_request = RequestInfo("GET", "/", "", {})
    config = app.config
    asset = config.asset
    lines = [f"farebox serve: a paid API on {url}"]
    if config.source is not None:
        lines[0] += f" (config {config.source})"
    lines += ["", "Routes"]
    for entry in config.routes:
        route = entry.route
        amount = route.amounts(no_request)[0]
        price = f"{asset.format(amount)} {asset.symbol}"
        line = f"  {route.method:<7} {route.path:<28} {price:>14}"
        lines.append(line + (f"  {route.description}" if route.description else ""))
    if config.upstream is None:
        lines.append("  (every other path is free)")
    else:
        # The proxy's method rule (farebox.server.proxy): an upstream may ignore the method.
        lines.append("  (every other path is free; other methods on these paths are 405)")
    lines += [
        "",
        f"Network     {config.network}",
        f"Asset       {asset.symbol} {asset.address} ({asset.name!r}, version {asset.version!r})",
        f"Pay to      {config.pay_to}",
        f"Settlement  {_settlement(app)}",
        *([f"Card        stripe ({config.card.network_id})"] if config.card is not None else []),
        f"Store       {_store_shown(config.store)}",
        f"Issuer      {app.gate.issuer}",
    ]
    key = app.gate.signing_key
    if config.receipt_key is None:
        lines.append(f"Receipt key kid {key.kid} (new for this run)")
    else:
        created = " (created now)" if app.receipt_key_created else ""
        lines.append(f"Receipt key kid {key.kid}, {config.receipt_key}{created}")
    if config.upstream is not None:
        lines.append(f"Upstream    {_shown(config.upstream)} (paid reverse proxy)")
    else:
        lines.append(f"Built-in    GET {url}/health is free; unrouted paths are 404")
    if app.chain is not None:
        lines.append(
            f"Pay for it  FAREBOX_PRIVATE_KEY=<key of development account #3> farebox get {url}"
            + config.routes[0].route.path
        )
    return "\n".join(lines)


def _settlement(app: FareboxApp) -> str:
    from farebox.config import (
        EMBEDDED_SETTLER,
        EmbeddedSettlement,
        FacilitatorSettlement,
        RpcSettlement,
    )

    settlement = app.config.settlement
    if isinstance(settlement, EmbeddedSettlement):
        settler = app.chain.accounts[EMBEDDED_SETTLER].address if app.chain else "?"
        return f"embedded chain (in-process), gas paid by development account #1 {settler}"
    if isinstance(settlement, RpcSettlement):
        return f"node {_shown(settlement.rpc_url)}, gas paid by the key in {settlement.settler_key}"
    assert isinstance(settlement, FacilitatorSettlement)
    source = {"env": " (from X402_FACILITATOR_URL)", "override": " (from --facilitator)"}
    return f"facilitator {_shown(settlement.url)}{source.get(settlement.source, '')}"


def serve_command(
    config: Annotated[Path, typer.Argument(help="The server's TOML config file.")],
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on.")] = 8402,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    facilitator: Annotated[
        str | None,
        typer.Option(
            "--facilitator",
            help="Settle through this x402 facilitator URL (overrides the config and "
            "X402_FACILITATOR_URL).",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes (more than one needs a shared store: PostgreSQL or Redis).",
        ),
    ] = 1,
) -> None:
    """Serve the paid API described by a TOML config file (see examples/)."""
    try:
        import uvicorn
    except ImportError:
        typer.echo("farebox serve needs uvicorn: pip install 'farebox[serve]'", err=True)
        raise typer.Exit(1) from None
    from farebox.config import CONFIG_ENV, FACILITATOR_ENV, build_app, load_config

    try:
        app = build_app(load_config(config, facilitator=facilitator))
    except ConfigError as exc:
        typer.echo(f"E_CONFIG: {exc}", err=True)
        raise typer.Exit(1) from None
    display_host = f"[{host}]" if ":" in host else host
    typer.echo(serve_banner(app, f"http://{display_host}:{port}"))
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="info")
        return
    if not isinstance(app.config.store, str):
        typer.echo(
            "E_CONFIG: server.store: several workers must share a PostgreSQL or Redis store "
            "(a memory store is per process, and SQLite is for one machine's few processes)",
            err=True,
        )
        raise typer.Exit(1)
    # Each worker process builds its own app from the same file (uvicorn imports the factory).
    os.environ[CONFIG_ENV] = str(config.resolve())
    if facilitator is not None:
        os.environ[FACILITATOR_ENV] = facilitator
    uvicorn.run(
        "farebox.config:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
    )


def _store_shown(store: Path | str | None) -> str:
    # A database URL may carry a password: show its scheme and host only.
    if store is None:
        return "memory (lost on exit)"
    if isinstance(store, Path):
        return str(store)
    parts = urlsplit(store)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
