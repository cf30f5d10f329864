"""The ``farebox`` command line: a thin face over the library (no protocol logic lives here).

Machine-readable results go to stdout as JSON; human messages and errors go to stderr. Exit codes:
0 success, 1 the operation failed (the ``E_*`` code is printed), 2 usage error; ``farebox get``
also exits 3 when it paid and printed the body but ``--require-receipt`` found the PEAC record
missing or invalid.

Each group of commands is its own ``typer.Typer`` added to :data:`app`; add new groups the same way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.text import Text

from farebox.cli_budget import budget_app, reconcile_budget_file
from farebox.cli_db import db_migrate_command
from farebox.cli_devchain import devchain_command
from farebox.cli_devstripe import devstripe_command
from farebox.cli_facilitator import facilitator_command
from farebox.cli_reconcile import reconcile_command
from farebox.cli_refund import refund_command
from farebox.cli_serve import serve_command
from farebox.errors import ConfigError, ReceiptError
from farebox.receipts import SigningKey, parse_jwks, save_signing_key, verify_receipt
from farebox.receipts.jws import MAX_JWS_BYTES, peek_compact
from farebox.receipts.keys import MAX_DOCUMENT_BYTES

__all__ = ["app", "main"]

app = typer.Typer(
    name="farebox",
    help="HTTP 402 payments between APIs and AI agents, with signed PEAC receipts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Ed25519 signing keys for PEAC receipts.", no_args_is_help=True)
receipts_app = typer.Typer(help="Verify and inspect PEAC receipts.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(receipts_app, name="receipts")
db_app = typer.Typer(help="The PostgreSQL payment store.", no_args_is_help=True)
db_app.command("migrate")(db_migrate_command)
app.add_typer(db_app, name="db")
app.add_typer(budget_app, name="budget")
app.command("devchain")(devchain_command)
app.command("devstripe")(devstripe_command)
app.command("facilitator")(facilitator_command)
app.command("serve")(serve_command)
app.command("reconcile")(reconcile_command)
app.command("refund")(refund_command)


def _stderr() -> Console:
    # Built per call so that whatever sys.stderr is now (a test runner's capture) receives it.
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _emit(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def _fail(code: str, message: str) -> NoReturn:
    # Text, not markup: messages may hold brackets that rich would read as style tags.
    _stderr().print(Text.assemble((code, "bold red"), ": ", message))
    raise typer.Exit(1)


def _read_jws(source: str) -> str:
    """The JWS from the argument, or from stdin when the argument is ``-``."""
    if source != "-":
        return source.strip()
    return sys.stdin.read(MAX_JWS_BYTES + 1).strip()


def _read_document(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        _fail("E_IO", f"cannot read {path}: {exc.strerror}")


JwsArg = Annotated[str, typer.Argument(help="The compact JWS, or - to read it from stdin.")]


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", help="Key file to write (mode 0600).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key file.")] = False,
) -> None:
    """Generate an Ed25519 signing key; print its kid, did:key and public JWK as JSON."""
    key = SigningKey.generate()
    try:
        save_signing_key(key, out, overwrite=force)
    except ConfigError as exc:
        _fail("E_KEY_FILE", str(exc))
    _emit({"kid": key.kid, "did": key.did_key, "public_jwk": key.public_jwk()})
    _stderr().print(Text(f"Wrote signing key {key.kid} to {out} (mode 0600)."))


@receipts_app.command("verify")
def receipts_verify(
    jws: JwsArg = "-",
    jwks: Annotated[
        Path | None,
        typer.Option("--jwks", help="JWKS file with the issuer's keys (not needed for did:key)."),
    ] = None,
    issuer: Annotated[
        str | None, typer.Option("--issuer", help="Require this exact issuer (iss).")
    ] = None,
) -> None:
    """Verify a PEAC Wire 0.2 receipt; print its claims as JSON when valid."""
    try:
        keys = parse_jwks(_read_document(jwks)) if jwks is not None else None
        result = verify_receipt(_read_jws(jws), keys, now=int(time.time()), issuer=issuer)
    except ReceiptError as exc:
        _fail(exc.code, exc.message)
    for warning in result.warnings:
        _stderr().print(Text(f"warning: {warning.code} {warning.pointer or ''}".rstrip()))
    _emit(result.claims)


@receipts_app.command("inspect")
def receipts_inspect(jws: JwsArg = "-") -> None:
    """Decode a receipt WITHOUT verifying it (signature, issuer and schema are not checked)."""
    try:
        header, payload = peek_compact(_read_jws(jws))
    except ReceiptError as exc:
        _fail(exc.code, exc.message)
    _stderr().print(
        Text.assemble(
            ("UNVERIFIED", "bold yellow"), ": decoded only; the signature was NOT checked."
        )
    )
    _emit({"verified": False, "header": header, "payload": payload})


@app.command()
def demo(
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep the sample paid API running on the chain.")
    ] = False,
    port: Annotated[int, typer.Option("--port", help="Port for --serve.")] = 8402,
    host: Annotated[str, typer.Option("--host", help="Interface for --serve.")] = "127.0.0.1",
) -> None:
    """Run a paid request end to end on the embedded chain, or (--serve) keep a sample paid API up."""
    if serve:
        from farebox.demo import serve_demo

        serve_demo(Console(highlight=False), host=host, port=port)
        return
    from farebox.demo import run_demo

    run_demo(Console(highlight=False))


@app.command("get")
def get(
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
    from farebox.agent.agent import Agent, PaymentFailed
    from farebox.agent.book import ReceiptBook
    from farebox.agent.budget import Budget
    from farebox.agent.httpx_auth import PAYMENT_EXTENSION, paying_client
    from farebox.agent.wallet import load_wallet
    from farebox.errors import PaymentError

    if rpc_url and budget_file is None:
        _stderr().print(Text("E_USAGE: --rpc-url reconciles a --budget-file: give one"))
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
                _stderr().print(Text(f"warning: budget not reconciled: {exc.message}"))
            else:
                if report["released"] != budget.format(0) or report["committed"]:
                    _stderr().print(
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
        _fail(exc.code, exc.message)
    except ConfigError as exc:
        _fail("E_CONFIG", str(exc))
    except httpx.HTTPError as exc:
        _fail("E_HTTP", f"{type(exc).__name__}: {exc}")
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
            _stderr().print(
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


def main() -> None:
    """Entry point of the ``farebox`` console script."""
    app()


if __name__ == "__main__":
    main()
