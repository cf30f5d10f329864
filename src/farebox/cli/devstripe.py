"""``farebox devstripe``: a local stand-in for the part of Stripe's API farebox uses, for trying
card payments without a Stripe account (see :mod:`farebox.dev.devstripe`; it is not Stripe and
moves no money)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from farebox.dev.devstripe import DevStripe

__all__ = ["devstripe_command"]


def devstripe_command(
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="TCP port on 127.0.0.1 (0 picks a free one).")
    ] = 12111,
) -> None:
    """Serve a local Stripe stand-in (PaymentIntents, Shared Payment Tokens, refunds) on 127.0.0.1."""
    from farebox.dev.devstripe import AGENT_KEY, DevStripe, running_devstripe

    stand_in = DevStripe(keep_requests=False)
    try:
        with running_devstripe(stand_in, port=port):
            typer.echo(_banner(stand_in, AGENT_KEY))
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                typer.echo("stopped", err=True)
    except OSError as exc:
        typer.echo(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None


def _banner(stand_in: DevStripe, agent_key: str) -> str:
    return "\n".join(
        [
            "farebox devstripe: a local STAND-IN for Stripe's API (not Stripe; no money moves)",
            "",
            f"API base         {stand_in.url}   ([card] api_base in a farebox config)",
            f"Seller           secret key {stand_in.api_key}, publishable key "
            f"{stand_in.publishable_key}",
            f"                 profile {stand_in.profile}   ([card] network_id)",
            f"Agent            secret key {agent_key} (mints Shared Payment Tokens)",
            "Test cards       pm_card_visa pays; pm_card_chargeDeclined declines; "
            "pm_card_authenticationRequired needs 3-D Secure",
            "",
            "Serving; Ctrl-C to stop. Everything is kept in memory and lost at exit.",
        ]
    )
