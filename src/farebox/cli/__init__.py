"""The ``farebox`` command line: a thin face over the library (no protocol logic lives here).

Machine-readable results go to stdout as JSON; human messages and errors go to stderr. Exit codes:
0 success, 1 the operation failed (the ``E_*`` code is printed), 2 usage error; ``farebox get``
also exits 3 when it paid and printed the body but ``--require-receipt`` found the PEAC record
missing or invalid.

Each command group is a module of this package holding its own ``typer.Typer`` (or command
function), added to :data:`app` here; add new groups the same way. The modules import the agent,
the server, the stores and py-evm only when their command runs, so ``farebox --help`` loads none
of them.
"""

from __future__ import annotations

import typer

from farebox.cli.budget import budget_app
from farebox.cli.db import db_migrate_command
from farebox.cli.demo import demo_command
from farebox.cli.devchain import devchain_command
from farebox.cli.devstripe import devstripe_command
from farebox.cli.facilitator import facilitator_command
from farebox.cli.get import get_command
from farebox.cli.keys import keys_app
from farebox.cli.receipts import receipts_app
from farebox.cli.reconcile import reconcile_command
from farebox.cli.refund import refund_command
from farebox.cli.serve import serve_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="farebox",
    help="HTTP 402 payments between APIs and AI agents, with signed PEAC receipts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
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
app.command("demo")(demo_command)
app.command("get")(get_command)


def main() -> None:
    """Entry point of the ``farebox`` console script."""
    app()
