"""``farebox receipts``: verify and inspect PEAC receipts."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from farebox.cli._output import emit, fail, stderr
from farebox.errors import ReceiptError
from farebox.receipts import parse_jwks, verify_receipt
from farebox.receipts.jws import MAX_JWS_BYTES, peek_compact
from farebox.receipts.keys import MAX_DOCUMENT_BYTES

__all__ = ["receipts_app"]

receipts_app = typer.Typer(help="Verify and inspect PEAC receipts.", no_args_is_help=True)

JwsArg = Annotated[str, typer.Argument(help="The compact JWS, or - to read it from stdin.")]


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
        fail("E_IO", f"cannot read {path}: {exc.strerror}")


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
        fail(exc.code, exc.message)
    for warning in result.warnings:
        stderr().print(Text(f"warning: {warning.code} {warning.pointer or ''}".rstrip()))
    emit(result.claims)


@receipts_app.command("inspect")
def receipts_inspect(jws: JwsArg = "-") -> None:
    """Decode a receipt WITHOUT verifying it (signature, issuer and schema are not checked)."""
    try:
        header, payload = peek_compact(_read_jws(jws))
    except ReceiptError as exc:
        fail(exc.code, exc.message)
    stderr().print(
        Text.assemble(
            ("UNVERIFIED", "bold yellow"), ": decoded only; the signature was NOT checked."
        )
    )
    emit({"verified": False, "header": header, "payload": payload})
