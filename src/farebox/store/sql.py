"""What the SQL stores (SQLite, PostgreSQL) share: the event query, written once."""

from __future__ import annotations

from typing import Any

from farebox.store.base import clamp_limit, payer_key

__all__ = ["events_query"]


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
