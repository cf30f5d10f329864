"""What the SQL stores (SQLite, PostgreSQL) share: the event query and the invoice statements,
written once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from farebox.store.base import TRAFFIC_KINDS, Invoice, clamp_limit, payer_key

__all__ = [
    "TRAFFIC_KINDS_SQL",
    "TrafficStatements",
    "events_query",
    "invoice_from_row",
    "invoice_row",
    "invoice_statements",
    "traffic_statements",
]

_INVOICE_COLUMNS = (
    "reference, route, resource, amount, currency, payment_intent, created_at, expires_at"
)


def events_query(
    placeholder: str,
    *,
    kind: str | None,
    payer: str | None,
    route: str | None,
    since: int | None,
    until: int | None,
    reference: str | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """The ``SELECT`` of :meth:`~farebox.store.base.Store.events` and its parameters, with the
    driver's parameter ``placeholder`` (``?`` for sqlite3, ``%s`` for psycopg)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("kind = ", kind),
        ("payer_key = ", payer_key(payer) if payer is not None else None),
        ("route = ", route),
        ("at >= ", since),
        ("at < ", until),
        ("reference = ", reference),
    ):
        if value is not None:
            clauses.append(column + placeholder)
            params.append(value)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    # Only the constant clauses above are formatted in; values are bound parameters.
    sql = (
        "SELECT id, kind, at, route, payer, reference, data FROM events"  # noqa: S608
        f"{where} ORDER BY at DESC, id DESC LIMIT {placeholder}"
    )
    params.append(clamp_limit(limit))
    return sql, params


#: :data:`~farebox.store.base.TRAFFIC_KINDS` as an SQL list, for statements, indexes and triggers.
TRAFFIC_KINDS_SQL = ", ".join(f"'{kind}'" for kind in TRAFFIC_KINDS)


class TrafficStatements(NamedTuple):
    """The traffic statements of one driver (see :func:`traffic_statements`)."""

    add: str  # day, kind, route, code: adds one
    cut: str  # keep: the id of the newest traffic event beyond the newest ``keep``
    prune: str  # before, cut id, limit: deletes the oldest traffic events
    counts: str  # since: the counts, oldest day first
    prune_counts: str  # before


def traffic_statements(placeholder: str) -> TrafficStatements:
    """The traffic count and prune statements with the driver's parameter ``placeholder``."""
    p = placeholder
    # Only constants are formatted in (the kinds are ours); values are bound parameters.
    kinds = TRAFFIC_KINDS_SQL
    return TrafficStatements(
        add=(
            "INSERT INTO traffic_counts (day, kind, route, code, n) "  # noqa: S608
            f"VALUES ({p}, {p}, {p}, {p}, 1) ON CONFLICT (day, kind, route, code) DO UPDATE SET n = traffic_counts.n + 1"
        ),
        cut=(
            f"SELECT id FROM events WHERE kind IN ({kinds}) "  # noqa: S608
            f"ORDER BY id DESC LIMIT 1 OFFSET {p}"
        ),
        prune=(
            "DELETE FROM events WHERE id IN (SELECT id FROM events "  # noqa: S608
            f"WHERE kind IN ({kinds}) AND (at < {p} OR id <= {p}) "
            # Never the newest row: SQLite would give its id to the next event.
            f"AND id < (SELECT MAX(id) FROM events) ORDER BY id LIMIT {p})"
        ),
        counts=(
            "SELECT day, kind, route, code, n FROM traffic_counts "  # noqa: S608
            f"WHERE day >= {p} ORDER BY day, kind, route, code"
        ),
        prune_counts=f"DELETE FROM traffic_counts WHERE day < {p}",  # noqa: S608
    )


def invoice_statements(placeholder: str) -> tuple[str, str, str, str]:
    """The invoice statements with the driver's parameter ``placeholder``: insert (parameters:
    :func:`invoice_row`), select by reference, select by payment intent (each: the value) and
    prune (``before``, :data:`~farebox.store.base.INVOICE_CLAIM_PREFIX`, the limit)."""
    # Only constants are formatted in; values are bound parameters.
    p = placeholder
    values = ", ".join([p] * 8)
    # No conflict target: a duplicate reference and a duplicate payment intent both insert
    # nothing, atomically (a unique index each).
    add = (
        f"INSERT INTO invoices ({_INVOICE_COLUMNS}) "  # noqa: S608
        f"VALUES ({values}) ON CONFLICT DO NOTHING"
    )
    select = f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE "  # noqa: S608
    # The claim key is invoice_claim_key(reference) spelled in SQL, answered by claims' primary
    # key. One statement, so that a claim is either seen (its invoice stays) or comes after.
    prune = (
        "DELETE FROM invoices WHERE reference IN (SELECT i.reference FROM invoices AS i "  # noqa: S608
        f"WHERE i.expires_at < {p} AND NOT EXISTS (SELECT 1 FROM claims AS c "
        f"WHERE c.key = {p} || i.reference) ORDER BY i.expires_at LIMIT {p})"
    )
    return add, f"{select}reference = {p}", f"{select}payment_intent = {p}", prune


def invoice_row(invoice: Invoice) -> tuple[Any, ...]:
    """``invoice`` as the parameters of the insert, in column order."""
    return (
        invoice.reference,
        invoice.route,
        invoice.resource,
        invoice.amount,
        invoice.currency,
        invoice.payment_intent,
        invoice.created_at,
        invoice.expires_at,
    )


def invoice_from_row(row: Sequence[Any]) -> Invoice:
    """The invoice of a selected row (the inverse of :func:`invoice_row`)."""
    reference, route, resource, amount, currency, payment_intent, created_at, expires_at = row
    return Invoice(
        reference,
        route,
        resource,
        int(amount),
        currency,
        payment_intent,
        int(created_at),
        int(expires_at),
    )
