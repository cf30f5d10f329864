"""``farebox reconcile CONFIG.toml``: resolve the server's unfinished payments from the chain once.

A running ``farebox serve`` does this in the background; the command is for a server that is
stopped, or to look now. It reports what it found as JSON and never broadcasts anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import anyio
import typer

from farebox.errors import ConfigError, PaymentError

__all__ = ["reconcile_command"]


def reconcile_command(
    config: Annotated[Path, typer.Argument(help="The server's TOML config (farebox serve).")],
    held_grace: Annotated[
        int, typer.Option("--held-grace", help="Seconds before a held claim counts as abandoned.")
    ] = 120,
) -> None:
    """Settle or release the payments whose outcome the server did not record (from the chain)."""
    from farebox.config import build_app, load_config

    try:
        app = build_app(load_config(config))
    except ConfigError as exc:
        typer.echo(f"E_CONFIG: {exc}", err=True)
        raise typer.Exit(1) from None
    reconciler = app.reconciler
    if reconciler is None:
        typer.echo("this server settles through a facilitator: it reconciles its own", err=True)
        raise typer.Exit(0)
    reconciler.held_grace = held_grace

    async def once() -> dict[str, int]:
        try:
            report = await reconciler.run_once()
        finally:
            await app.aclose()
        return {
            "settled": report.settled,
            "released": report.released,
            "waiting": report.waiting,
            "errors": report.errors,
            "pruned": report.pruned,
        }

    try:
        typer.echo(json.dumps(anyio.run(once)))
    except PaymentError as exc:
        typer.echo(f"{exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
