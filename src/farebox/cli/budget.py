"""``farebox budget``: what an agent's budget file has spent, and settling it from the chain.

``show`` prints the spending (today, total, and what of it outstanding authorizations hold);
``reconcile`` reads each outstanding authorization on the chains given by ``--rpc-url`` and
commits or releases it (:mod:`farebox.agent.reconcile`). Both print JSON on stdout. Exit codes: 0
done, 1 the budget file or a node failed, 2 usage error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from farebox.errors import ConfigError, PaymentError

if TYPE_CHECKING:  # the CLI starts without loading the agent
    from farebox.agent.budget import Budget, Spending

__all__ = ["budget_app", "reconcile_budget_file"]

budget_app = typer.Typer(
    help="An agent's budget file: spending, and settling it from the chain.",
    no_args_is_help=True,
)

BudgetFile = Annotated[
    Path, typer.Option("--budget-file", help="The agent's SQLite budget file.", exists=True)
]
Currency = Annotated[str, typer.Option("--currency", help="The budget's currency.")]
RpcUrls = Annotated[
    list[str],
    typer.Option("--rpc-url", help="A JSON-RPC node of a network paid on (repeat for several)."),
]


def _fail(code: str, message: str) -> NoReturn:
    typer.echo(f"{code}: {message}", err=True)
    raise typer.Exit(1)


def _spending_json(spending: Spending) -> dict[str, Any]:
    from farebox.agent.budget import format_units

    currency = spending.currency

    def money(units: int) -> str:
        return format_units(units, currency)

    return {
        "currency": currency,
        "today_committed": money(spending.today_committed),
        "today_reserved": money(spending.today_reserved),
        "total_committed": money(spending.total_committed),
        "total_reserved": money(spending.total_reserved),
        "outstanding": money(spending.outstanding),
        "outstanding_authorizations": spending.outstanding_count,
    }


def reconcile_budget_file(budget: Budget, urls: list[str], *, grace: int) -> dict[str, Any]:
    """Reconcile ``budget`` against the nodes at ``urls``; the report as JSON-ready data."""
    from farebox.agent.reconcile import reconcile_sync

    report = reconcile_sync(budget, urls, grace=grace)
    document = report.to_json()
    document["released"] = budget.format(report.released_units)
    return document


def _open(path: Path, currency: str) -> Budget:
    from farebox.agent.budget import Budget, Limits

    # Limits are not kept in the file (each agent states its own): none are needed to read it.
    return Budget(path, Limits(), currency=currency)


@budget_app.command("show")
def budget_show(budget_file: BudgetFile, currency: Currency = "USD") -> None:
    """Print what the budget has spent, and what outstanding authorizations hold."""
    try:
        with _open(budget_file, currency) as budget:
            spending = budget.spent(now=int(time.time()))
            outstanding = budget.outstanding()
    except PaymentError as exc:
        _fail(exc.code, exc.message)
    except ConfigError as exc:
        _fail("E_CONFIG", str(exc))
    document = _spending_json(spending)
    document["authorizations"] = [
        {
            "reservation": o.reservation,
            "network": o.authorization.network,
            "token": o.authorization.token,
            "nonce": o.authorization.nonce,
            "amount": str(o.asset_amount),
            "payee": o.payee,
            "resource": o.resource,
            "valid_before": o.authorization.valid_before,
        }
        for o in outstanding
    ]
    typer.echo(json.dumps(document, indent=2))


@budget_app.command("reconcile")
def budget_reconcile(
    budget_file: BudgetFile,
    rpc_url: RpcUrls,
    currency: Currency = "USD",
    grace: Annotated[
        int,
        typer.Option(
            "--grace", help="Seconds past validBefore before an unused authorization is released."
        ),
    ] = 120,
) -> None:
    """Commit the outstanding authorizations the chain shows used, release those it shows
    cancelled or expired unused; the rest keep counting."""
    if grace < 0:
        typer.echo("E_USAGE: --grace is a non-negative number of seconds", err=True)
        raise typer.Exit(2)
    try:
        with _open(budget_file, currency) as budget:
            document = reconcile_budget_file(budget, rpc_url, grace=grace)
            document["spending"] = _spending_json(budget.spent(now=int(time.time())))
    except PaymentError as exc:
        _fail(exc.code, exc.message)
    except ConfigError as exc:
        _fail("E_CONFIG", str(exc))
    typer.echo(json.dumps(document, indent=2))
