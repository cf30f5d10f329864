"""``farebox reconcile CONFIG.toml``: resolve the server's unfinished payments once.

A running ``farebox serve`` does this in the background; the command is for a server that is
stopped, or to look now. It reports what it found as JSON and never broadcasts anything.

Without a chain to read (a server settling through a facilitator, with no
``reconcile_rpc_url``), pending payments wait for an operator: ``--list`` shows them, and
``--settled KEY --transaction TX`` or ``--release KEY`` records what the operator found.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from farebox.errors import ConfigError, PaymentError

__all__ = ["reconcile_command"]

_TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")


def reconcile_command(
    config: Annotated[Path, typer.Argument(help="The server's TOML config (farebox serve).")],
    held_grace: Annotated[
        int, typer.Option("--held-grace", help="Seconds before a held claim counts as abandoned.")
    ] = 120,
    show: Annotated[
        bool, typer.Option("--list", help="List the unfinished claims; change nothing.")
    ] = False,
    settled: Annotated[
        str | None,
        typer.Option(
            "--settled", help="Record that this claim's payment settled (with --transaction)."
        ),
    ] = None,
    transaction: Annotated[
        str | None, typer.Option("--transaction", help="The transaction that moved the money.")
    ] = None,
    release: Annotated[
        str | None,
        typer.Option("--release", help="Record that this claim's payment never moved money."),
    ] = None,
) -> None:
    """Settle or release the payments whose outcome the server did not record, and prune old
    traffic; or, with --settled or --release, record an operator's finding for one claim."""
    import anyio

    from farebox.config import build_app, load_config

    if settled is not None and release is not None:
        _fail("E_USAGE", "choose one of --settled and --release")
    if (settled is None) != (transaction is None):
        _fail("E_USAGE", "--settled KEY needs --transaction TX (and --transaction needs --settled)")
    if transaction is not None and _TX_HASH.fullmatch(transaction) is None:
        _fail("E_USAGE", "--transaction: a transaction hash is 0x and 64 hex digits")
    try:
        app = build_app(load_config(config))
    except ConfigError as exc:
        _fail("E_CONFIG", str(exc))
    reconciler = app.reconciler
    reconciler.held_grace = held_grace

    async def once() -> Any:
        try:
            if show:
                claims = await reconciler.unresolved()
                return [
                    {"key": c.key, "state": c.state, "at": c.at, "transaction": c.transaction}
                    for c in claims
                ]
            key = settled if settled is not None else release
            if key is not None:
                done = await reconciler.resolve_by_hand(
                    key, settled=settled is not None, transaction=transaction
                )
                return {"claim": key, "recorded": done}
            report = await reconciler.run_once()
        finally:
            await app.aclose()
        return {
            "settled": report.settled,
            "released": report.released,
            "waiting": report.waiting,
            "errors": report.errors,
            "pruned": report.pruned,
            "traffic_pruned": report.traffic_pruned,
        }

    try:
        result = anyio.run(once)
    except PaymentError as exc:
        _fail(exc.code, exc.message)
    typer.echo(json.dumps(result))
    if isinstance(result, dict) and result.get("recorded") is False:
        typer.echo("that claim is not pending or held: nothing recorded", err=True)
        raise typer.Exit(1)


def _fail(code: str, message: str) -> NoReturn:
    typer.echo(f"{code}: {message}", err=True)
    raise typer.Exit(1)
