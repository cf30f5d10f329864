"""``farebox db migrate``: create or update the PostgreSQL payment store's schema.

psycopg is imported when the command runs, so that the other commands never load it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from farebox.errors import FareboxError

__all__ = ["db_migrate_command"]


def db_migrate_command(
    dsn: Annotated[
        str,
        typer.Option(
            "--dsn",
            envvar="FAREBOX_DATABASE_URL",
            help="PostgreSQL URL of the store (default: $FAREBOX_DATABASE_URL).",
            show_default=False,
            show_envvar=True,
        ),
    ],
) -> None:
    """Apply the PostgreSQL store's migrations that the database lacks (safe to run again)."""
    import asyncio

    try:
        from farebox.store.postgres import migrate
    except ImportError:
        typer.echo("error: PostgreSQL support needs: pip install 'farebox[postgres]'", err=True)
        raise typer.Exit(1) from None
    try:
        applied = asyncio.run(migrate(dsn))
    except FareboxError as exc:
        # The error's message is generic (never the DSN); its cause names what failed.
        cause = exc.__cause__
        detail = f" ({type(cause).__name__})" if cause is not None else ""
        typer.echo(f"error: {exc}{detail}", err=True)
        raise typer.Exit(1) from None
    if applied:
        for version in applied:
            typer.echo(f"applied {version}")
    else:
        typer.echo("the database is up to date")
