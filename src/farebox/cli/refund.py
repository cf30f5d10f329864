"""``farebox refund RECEIPT_REF --config farebox.toml``: refund a card payment, with a signed record.

``RECEIPT_REF`` is the ``receipt_ref`` (``sha256:…``) of the PEAC record the server issued for the
payment. The server's config gives the store, the receipt key (it verifies that record and signs
the refund's) and the ``[card]`` section (the Stripe account). ``--amount`` is an integer of minor
units of the payment's currency (25 is $0.25 for a usd payment); without it, everything not yet
refunded is refunded. Decimal prices such as ``$0.25`` are not accepted: a refund's currency is the
payment's, and minor units are exact for every currency.

Prints the refund id, the amount refunded, what remains and the PEAC refund record, or, with
``--json``, one JSON object. Exit 0 on success; 1 with ``code: message`` on stderr otherwise
(``E_CONFIG`` for a configuration problem).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from farebox.errors import ConfigError, PaymentError

__all__ = ["refund_command"]


def refund_command(
    receipt_ref: Annotated[
        str, typer.Argument(help="The receipt_ref (sha256:...) of the payment's PEAC record.")
    ],
    config: Annotated[
        Path, typer.Option("--config", help="The server's TOML config (farebox serve).")
    ],
    amount: Annotated[
        int | None,
        typer.Option(
            "--amount",
            help="Minor units to refund (25 = $0.25 of a usd payment); default: all that is left.",
        ),
    ] = None,
    reason: Annotated[
        str | None,
        typer.Option(
            "--reason", help="duplicate, fraudulent or requested_by_customer (kept in metadata)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Refund all or part of a card payment and print the signed PEAC refund record."""
    import anyio

    from farebox.config import card_ledger, load_config, open_store
    from farebox.receipts.keys import load_signing_key
    from farebox.server.refunds import refund_payment

    try:
        loaded = load_config(config)
        if loaded.card is None:
            raise ConfigError("card: no [card] section: this server takes no card payments")
        if loaded.receipt_key is None:
            raise ConfigError(
                "server.receipt_key: refunds need the key file that signed the payment records"
            )
        if loaded.store is None:
            raise ConfigError('server.store: "memory" keeps no payments to refund')
        try:
            signing_key = load_signing_key(loaded.receipt_key)
        except ConfigError as exc:
            raise ConfigError(f"server.receipt_key: {exc}") from None
        ledger, http_client = card_ledger(loaded.card)
    except ConfigError as exc:
        typer.echo(f"E_CONFIG: {exc}", err=True)
        raise typer.Exit(1) from None
    store = open_store(loaded)

    async def run() -> dict[str, object]:
        try:
            result = await refund_payment(
                store,
                ledger,
                receipt_ref=receipt_ref,
                amount=amount,
                signing_key=signing_key,
                issuer=loaded.issuer,
                reason=reason,
            )
        finally:
            try:
                await store.aclose()
            finally:
                await http_client.close_async()  # type: ignore[no-untyped-call]
        return result.as_dict()

    try:
        outcome = anyio.run(run)
    except PaymentError as exc:
        typer.echo(f"{exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(outcome, indent=2))
        return
    currency = str(outcome["currency"]).upper()
    typer.echo(f"refund      {outcome['refund']} ({outcome['status']})")
    typer.echo(f"payment     {outcome['payment_intent']}")
    typer.echo(f"refunded    {outcome['amount']} {currency} (minor units)")
    typer.echo(f"in total    {outcome['refunded']} {currency}")
    typer.echo(f"remaining   {outcome['remaining']} {currency}")
    typer.echo(f"record_ref  {outcome['record_ref']}")
    typer.echo(f"record      {outcome['record']}")
