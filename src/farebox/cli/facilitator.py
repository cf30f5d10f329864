"""``farebox facilitator``: serve x402's ``/verify``, ``/settle`` and ``/supported`` over HTTP.

The service settles ``exact`` EVM payments (EIP-3009 ``transferWithAuthorization``) on one chain
reached over JSON-RPC, paying gas from the settler key; any token the proof names is settled (the
token itself checks the signature). uvicorn and the service
are imported when the command runs, so that the other commands never load them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from farebox.errors import ConfigError, FareboxError
from farebox.net import is_loopback

__all__ = ["chain_network", "facilitator_command"]


async def chain_network(rpc_url: str, *, timeout: float = 10.0) -> str:
    """The CAIP-2 network of the node at ``rpc_url``, from its ``eth_chainId``."""
    from farebox.ledgers.rpc import HttpRpc

    rpc = HttpRpc(rpc_url, timeout=timeout)
    try:
        answer = await rpc.request("eth_chainId")
    finally:
        await rpc.aclose()
    if not isinstance(answer, str) or not answer.startswith("0x"):
        raise ConfigError("the node returned a malformed chain id")
    try:
        chain_id = int(answer, 16)
    except ValueError:
        raise ConfigError("the node returned a malformed chain id") from None
    if chain_id <= 0:
        raise ConfigError("the node returned a malformed chain id")
    return f"eip155:{chain_id}"


def facilitator_command(
    ledger: Annotated[
        str, typer.Option("--ledger", help="JSON-RPC URL of the chain's node.", show_default=False)
    ],
    key: Annotated[
        Path,
        typer.Option(
            "--key", help="File with the settler's hex EVM key (pays the gas).", show_default=False
        ),
    ],
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on.")] = 4021,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    network: Annotated[
        str | None,
        typer.Option(help="CAIP-2 network, e.g. eip155:84532 (default: ask the node)."),
    ] = None,
    store: Annotated[
        Path, typer.Option(help="SQLite file recording claims and settlements.")
    ] = Path(".farebox/facilitator.sqlite"),
    token_env: Annotated[
        str,
        typer.Option(help="Environment variable holding the bearer token /settle requires."),
    ] = "FAREBOX_FACILITATOR_TOKEN",  # noqa: S107 (a variable name)
) -> None:
    """Run an x402 facilitator: verify and settle exact EVM payments on one chain."""
    try:
        import uvicorn
    except ModuleNotFoundError:
        typer.echo("farebox facilitator needs uvicorn: pip install 'farebox[serve]'", err=True)
        raise typer.Exit(1) from None
    import asyncio

    from farebox.eth import EvmAccount
    from farebox.facilitator.local import LocalFacilitator
    from farebox.facilitator.service import facilitator_app
    from farebox.ledgers.evm import EvmLedger
    from farebox.ledgers.rpc import HttpRpc
    from farebox.store.sqlite import SqliteStore

    try:
        settler = EvmAccount.from_file(key)
        if network is None:
            network = asyncio.run(chain_network(ledger))
        evm_ledger = EvmLedger(HttpRpc(ledger), settler, network=network)
    except (FareboxError, ValueError) as exc:
        # Messages name neither the key nor the node URL (it may embed an API key).
        typer.echo(f"cannot start the facilitator: {exc}", err=True)
        raise typer.Exit(1) from None
    token = os.environ.get(token_env) or None
    if token is None and not is_loopback(host):
        typer.echo(
            f"warning: listening on {host} without ${token_env}: anyone who reaches it can "
            "make the settler spend gas on /settle",
            err=True,
        )
    app = facilitator_app(
        LocalFacilitator([evm_ledger]),
        SqliteStore(store),
        token=token,
        close_on_shutdown=True,
        reconcile_every=30.0,
    )
    typer.echo(
        f"farebox facilitator on http://{host}:{port}  network {network}  "
        f"settler {settler.address}  /settle {'needs a bearer token' if token else 'is open'}"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
