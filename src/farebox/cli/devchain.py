"""``farebox devchain``: a local EVM chain with a USDC-like token, served over JSON-RPC.

The chain's modules are imported when the command runs, so that the other commands never load
py-evm.
"""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal
from typing import TYPE_CHECKING, Annotated

import typer

from farebox.money import format_amount
from farebox.net import is_loopback

if TYPE_CHECKING:
    from farebox.dev.devchain import DevChain

__all__ = ["devchain_banner", "devchain_command"]


def devchain_banner(chain: DevChain, url: str) -> str:
    """What ``farebox devchain`` prints when it starts: the chain, the token, the accounts.

    Addresses and balances only: the accounts' keys are public test keys, and still not printed.
    """
    asset = chain.asset
    lines = [
        "farebox devchain: an EVM development chain (py-evm), one block per transaction",
        "",
        f"Chain ID   {chain.chain_id}  ({chain.network})",
        f"RPC URL    {url}",
        f"Token      {asset.address}  {asset.name} ({asset.symbol}), {asset.decimals} decimals, "
        f'EIP-712 version "{asset.version}"',
        "",
        f"Accounts   the {len(chain.accounts)} standard development accounts of the mnemonic",
        '           "test test test test test test test test test test test junk"',
        "           (m/44'/60'/0'/0/i, as anvil and hardhat). Their keys are public:",
        "           never send them anything of value.",
    ]
    for index, account in enumerate(chain.accounts):
        usdc = format_amount(chain.balance_of(account.address), asset.decimals)
        # Gas spent leaves long fractions of ETH: four decimals are enough to read.
        eth = Decimal(chain.eth_balance(account.address)).scaleb(-18)
        eth = eth.quantize(Decimal("0.0001"), rounding=ROUND_DOWN)
        lines.append(f"  ({index}) {account.address}  {usdc:>10} {asset.symbol}  {eth:>10} ETH")
    lines += ["", "Serving JSON-RPC; Ctrl-C to stop."]
    return "\n".join(lines)


def devchain_command(
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="TCP port for JSON-RPC (0 picks a free one).")
    ] = 8545,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Run a local EVM chain with a USDC-like token and ten funded accounts (JSON-RPC over HTTP)."""
    try:
        from farebox.dev.devchain import DevChain
        from farebox.dev.rpc_server import DevChainServer
    except ModuleNotFoundError as exc:
        typer.echo(f"farebox devchain needs {exc.name}: pip install 'farebox[devchain]'", err=True)
        raise typer.Exit(1) from None
    chain = DevChain()
    try:
        server = DevChainServer(chain, host, port)
    except OSError as exc:
        typer.echo(f"cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    if not is_loopback(host):
        typer.echo(
            f"warning: listening on {host}: anyone who reaches it can spend the dev accounts",
            err=True,
        )
    typer.echo(devchain_banner(chain, server.url))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
    finally:
        server.stop()
