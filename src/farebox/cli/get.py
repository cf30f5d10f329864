"""``farebox get URL``: a paying curl, with the budget, receipt book and receipt rule of an agent.

The body goes to stdout, the payment (if any) as JSON to stderr. Exit codes: 0 success, 1 the
request or the payment failed, 2 usage error, 3 paid and printed the body but ``--require-receipt``
found the PEAC record missing or invalid. The agent (and httpx) are imported when the command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from farebox.cli._output import fail, stderr
from farebox.cli.budget import reconcile_budget_file
from farebox.errors import ConfigError

__all__ = ["get_command"]


def get_command(
    url: Annotated[str, typer.Argument(help="The URL to fetch, paying if it answers 402.")],
    key_file: Annotated[
        Path | None,
        typer.Option("--key-file", help="File with the hex EVM key (else $FAREBOX_PRIVATE_KEY)."),
    ] = None,
    max_price: Annotated[
        str, typer.Option("--max", help="Most to pay for this request, e.g. '$0.05'.")
    ] = "$0.10",
    budget_file: Annotated[
        Path | None,
        typer.Option("--budget-file", help="SQLite file keeping the budget across calls."),
    ] = None,
    per_day: Annotated[
        str | None, typer.Option("--per-day", help="Daily limit kept in --budget-file.")
    ] = None,
    total: Annotated[
        str | None, typer.Option("--total", help="Lifetime limit kept in --budget-file.")
    ] = None,
    book: Annotated[
        Path | None, typer.Option("--book", help="SQLite receipt book to add the receipt to.")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per HTTP request.")] = 30.0,
    rpc_url: Annotated[
        list[str] | None,
        typer.Option(
            "--rpc-url",
            help="Reconcile --budget-file against this node before paying (repeatable).",
        ),
    ] = None,
    require_receipt: Annotated[
        bool,
        typer.Option(
            "--require-receipt", help="Exit 3 (body still printed) unless a valid PEAC record."
        ),
    ] = False,
) -> None:
    """A paying curl: print the body to stdout and the payment (if any) as JSON to stderr.

    Once paid, the body is always printed: a PEAC record that is missing or fails verification
    is a warning on stderr (exit 0), or with --require-receipt exit 3.
    """
    import httpx

    from farebox.agent.agent import Agent, PaymentFailed
    from farebox.agent.book import ReceiptBook
    from farebox.agent.budget import Budget
    from farebox.agent.httpx_auth import PAYMENT_EXTENSION, paying_client
    from farebox.agent.wallet import load_wallet
    from farebox.errors import PaymentError

    if rpc_url and budget_file is None:
        stderr().print(Text("E_USAGE: --rpc-url reconciles a --budget-file: give one"))
        raise typer.Exit(2)
    exit_code = 0
    try:
        account = load_wallet(key_file)
        budget = Budget.from_prices(
            budget_file, per_request=max_price, per_day=per_day, total=total
        )
        if rpc_url:
            try:
                report = reconcile_budget_file(budget, rpc_url, grace=120)
            except PaymentError as exc:
                # Reconciling can only release money: without it the budget is merely stricter.
                stderr().print(Text(f"warning: budget not reconciled: {exc.message}"))
            else:
                if report["released"] != budget.format(0) or report["committed"]:
                    stderr().print(
                        Text(
                            f"budget reconciled: {report['committed']} confirmed spent, "
                            f"{report['released']} released, {report['pending']} still outstanding"
                        )
                    )
        agent = Agent(
            account,
            budget=budget,
            book=ReceiptBook(book) if book is not None else None,
            require_receipt=require_receipt,
        )
        with paying_client(agent, timeout=timeout) as client:
            try:
                response = client.get(url)
                payment = response.extensions.get(PAYMENT_EXTENSION)
            except PaymentFailed as exc:
                # Paid, and the record failed --require-receipt: the body is still the caller's.
                if exc.payment is None or exc.response is None:
                    raise
                response, payment, exit_code = exc.response, exc.payment, 3
                response.read()
    except PaymentError as exc:
        fail(exc.code, exc.message)
    except ConfigError as exc:
        fail("E_CONFIG", str(exc))
    except httpx.HTTPError as exc:
        fail("E_HTTP", f"{type(exc).__name__}: {exc}")
    sys.stdout.buffer.write(response.content)
    sys.stdout.flush()
    if payment is not None:
        asset = payment.asset
        problem = payment.receipt_error
        summary = {
            "status": response.status_code,
            "paid": f"{asset.format(payment.offer.amount)} {asset.symbol}",
            "amount": str(payment.offer.amount),
            "network": payment.offer.network,
            "pay_to": payment.offer.pay_to,
            "payer": payment.payer,
            "transaction": payment.settlement.transaction,
            "receipt_verified": payment.receipt is not None,
            "receipt_issuer": payment.receipt.issuer if payment.receipt else None,
            "receipt_error": f"{problem.code}: {problem.message}" if problem else None,
        }
        typer.echo(json.dumps(summary, indent=2), err=True)
        if problem is not None and (payment.receipt_jws is not None or require_receipt):
            stderr().print(
                Text.assemble(
                    ("warning", "bold yellow"),
                    f": paid (transaction {payment.settlement.transaction}), but the receipt "
                    f"failed: {problem.code}: {problem.message}",
                )
            )
    if exit_code:
        raise typer.Exit(exit_code)
    if response.status_code >= 400:
        raise typer.Exit(1)
