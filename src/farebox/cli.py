"""The ``farebox`` command line: a thin face over the library (no protocol logic lives here).

Machine-readable results go to stdout as JSON; human messages and errors go to stderr. Exit codes:
0 success, 1 the operation failed (the ``E_*`` code is printed), 2 usage error.

Each group of commands is its own ``typer.Typer`` added to :data:`app`; add new groups the same way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

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
def demo() -> None:
    """Walk through one payment cycle in this process: 402, proof, verification, refusals, receipt."""
    from farebox.demo import run_demo

    run_demo(Console(highlight=False))


def main() -> None:
    """Entry point of the ``farebox`` console script."""
    app()
