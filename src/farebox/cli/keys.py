"""``farebox keys``: Ed25519 signing keys for PEAC receipts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from farebox.cli._output import emit, fail, stderr
from farebox.errors import ConfigError
from farebox.receipts import SigningKey, save_signing_key

__all__ = ["keys_app"]

keys_app = typer.Typer(help="Ed25519 signing keys for PEAC receipts.", no_args_is_help=True)


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
        fail("E_KEY_FILE", str(exc))
    emit({"kid": key.kid, "did": key.did_key, "public_jwk": key.public_jwk()})
    stderr().print(Text(f"Wrote signing key {key.kid} to {out} (mode 0600)."))
