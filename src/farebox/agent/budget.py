"""How much an agent may still spend: limits per request, per UTC day and in total, kept in SQLite.

A budget counts in one currency (the ``peg`` of the assets it pays with, e.g. ``"USD"``) at a fixed
scale of 10**-18 currency units (:data:`SCALE`), so that an amount of any stablecoin converts to it
exactly, and so does an amount of a fiat currency in its minor units (:func:`fiat_to_units`, card
payments: ``reserve(amount, currency="usd", ...)``). Money is set aside before paying (:meth:`Budget.reserve`) and then either spent
(:meth:`Budget.commit`) or given back (:meth:`Budget.release`). Each call is one short SQLite
transaction; ``reserve`` checks and sets aside in one ``BEGIN IMMEDIATE`` transaction, so any
number of processes sharing the file together never exceed a limit.

What counts as spent. A signed EIP-3009 authorization can move money for anyone who holds it until
its ``validBefore``, whatever the server that received it says: a refusal, a 500 or a redirect is
the server's word, and a hostile server can refuse and settle later. So the moment an
authorization leaves the agent it is committed (:meth:`Budget.sent`) and kept as *outstanding*
with what names it on chain. It stops counting only when the chain proves it can never move
money: the token logged its cancellation (EIP-3009 ``cancelAuthorization``), or a block dated at
least a grace period past ``validBefore`` shows it unused (:meth:`Budget.resolve`, driven by
:mod:`farebox.agent.reconcile`). A success answer with a transaction settles it for good; so does
the chain showing it used. No refusal code releases it: every code is something a hostile server
can send.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TypeVar

from farebox.errors import ConfigError, PaymentError
from farebox.money import ASSETS, Asset, format_amount
from farebox.store.sqlite import open_database

__all__ = [
    "FIAT_EXPONENTS",
    "OUTCOMES",
    "SCALE",
    "Budget",
    "Limits",
    "Outstanding",
    "Reservation",
    "SentAuthorization",
    "Spending",
    "fiat_to_units",
    "format_units",
    "parse_units",
    "to_units",
]

T = TypeVar("T")

#: Budget amounts are integers of 10**-SCALE currency units.
SCALE = 18

DAY = 86_400

# Minor-unit exponents of the currencies a card amount may be in, as Stripe counts amounts (its
# "zero-decimal" and "three-decimal" lists; every other listed code has two decimals). Currencies
# Stripe treats specially (ISK, HUF, TWD, UGX: amounts sent with two decimals that must be whole
# units) are left out, so they are refused rather than counted wrong.
_ZERO_DECIMAL = "BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF VND VUV XAF XOF XPF"
_THREE_DECIMAL = "BHD JOD KWD OMR TND"
_TWO_DECIMAL = (
    "USD EUR GBP CHF CAD AUD NZD SEK NOK DKK PLN CZK RON BGN SGD HKD MXN BRL INR ZAR CNY AED ILS "
    "TRY THB MYR PHP IDR SAR QAR EGP NGN KES COP PEN ARS MAD"
)
#: ISO 4217 code -> digits after the decimal point of its minor unit.
FIAT_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(_TWO_DECIMAL.split(), 2),
    **dict.fromkeys(_ZERO_DECIMAL.split(), 0),
    **dict.fromkeys(_THREE_DECIMAL.split(), 3),
}

_SCHEMA_VERSION = 2
_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    # Amounts are decimal TEXT: a day's budget in 10**-18 units passes 2**63 at about $9.2.
    """
    CREATE TABLE IF NOT EXISTS reservations (
        id TEXT PRIMARY KEY,
        amount TEXT NOT NULL,
        day INTEGER NOT NULL,
        at INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('active', 'committed', 'released')),
        asset TEXT NOT NULL,
        asset_amount TEXT NOT NULL,
        payee TEXT NOT NULL DEFAULT '',
        resource TEXT NOT NULL DEFAULT '',
        settled_at INTEGER,
        reference TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS reservations_active ON reservations (at) WHERE state = 'active'",
    # Running sums of committed amounts, so that a reservation reads two rows rather than the
    # whole history: one per UTC day, and period -1 for all time.
    """
    CREATE TABLE IF NOT EXISTS committed (
        period INTEGER PRIMARY KEY,
        amount TEXT NOT NULL
    )
    """,
    # Version 2: the signed authorizations that left the agent, one per committed reservation,
    # until the chain (or a success answer) says what became of them.
    """
    CREATE TABLE IF NOT EXISTS authorizations (
        reservation TEXT PRIMARY KEY REFERENCES reservations (id),
        network TEXT NOT NULL,
        token TEXT NOT NULL,
        authorizer TEXT NOT NULL,
        nonce TEXT NOT NULL,
        valid_before INTEGER NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('outstanding', 'settled', 'used', 'cancelled', 'expired')),
        transaction_hash TEXT,
        resolved_at INTEGER
    )
    """,
    "CREATE INDEX IF NOT EXISTS authorizations_outstanding ON authorizations (valid_before) "
    "WHERE state = 'outstanding'",
)
_ALL_TIME = -1

#: How an outstanding authorization ends: the chain shows it ``used`` (money moved), or it can
#: never move money: ``cancelled`` on chain, or ``expired`` unused.
OUTCOMES = ("used", "cancelled", "expired")


@dataclass(frozen=True, slots=True)
class Limits:
    """The most a budget lets through, in budget units (10**-18 of its currency); ``None`` is no
    limit. ``per_day`` counts UTC days."""

    per_request: int | None = None
    per_day: int | None = None
    total: int | None = None

    def __post_init__(self) -> None:
        for name in ("per_request", "per_day", "total"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"limit {name} must be a non-negative int of budget units")


@dataclass(frozen=True, slots=True)
class Reservation:
    """Money set aside for one payment until it is committed or released.

    ``amount`` is in budget units, ``asset_amount`` in the asset's atomic units; ``day`` is the UTC
    day (``at // 86400``) the amount counts against.
    """

    id: str
    amount: int
    asset: str
    asset_amount: int
    at: int
    day: int
    payee: str = ""
    resource: str = ""


@dataclass(frozen=True, slots=True)
class SentAuthorization:
    """What names a signed EIP-3009 authorization on chain: the token's ``authorizationState``
    key (``authorizer``, ``nonce``) on ``network`` (CAIP-2), and when it stops being usable."""

    network: str
    token: str
    authorizer: str
    nonce: str  # 0x + 64 hex digits
    valid_before: int  # unix seconds; the token refuses it from this block timestamp on


@dataclass(frozen=True, slots=True)
class Outstanding:
    """A committed payment whose authorization left the agent with no proof yet of what became
    of it: it counts as spent until :meth:`Budget.resolve` says otherwise."""

    reservation: str
    amount: int  # budget units
    asset: str
    asset_amount: int
    at: int
    payee: str
    resource: str
    authorization: SentAuthorization


@dataclass(frozen=True, slots=True)
class Spending:
    """What a budget has used: committed (money moved) and reserved (being paid, not expired),
    today (UTC) and in total, in budget units, with the limits they count against."""

    currency: str
    day: int
    today_committed: int
    today_reserved: int
    total_committed: int
    total_reserved: int
    limits: Limits
    #: Of the committed total, what authorizations still outstanding hold (may still move money;
    #: released if the chain proves they cannot). Filled by :meth:`Budget.spent`.
    outstanding: int = 0
    outstanding_count: int = 0

    @property
    def today(self) -> int:
        """Committed and reserved today."""
        return self.today_committed + self.today_reserved

    @property
    def total(self) -> int:
        """Committed and reserved in total."""
        return self.total_committed + self.total_reserved

    @property
    def remaining_today(self) -> int | None:
        """What today's limit still allows, or ``None`` without a daily limit."""
        per_day = self.limits.per_day
        return None if per_day is None else max(0, per_day - self.today)

    @property
    def remaining_total(self) -> int | None:
        """What the total limit still allows, or ``None`` without one."""
        total = self.limits.total
        return None if total is None else max(0, total - self.total)


def to_units(amount: int, asset: Asset) -> int:
    """``amount`` atomic units of ``asset`` in budget units (10**-18 of its currency).

    Exact for assets with up to 18 decimals (all known stablecoins). A finer asset's amount is
    rounded up, so that a budget never counts less than was spent.
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ConfigError("an amount is a non-negative int of atomic units")
    shift = SCALE - asset.decimals
    factor: int = 10 ** abs(shift)
    if shift >= 0:
        return amount * factor
    return -(-amount // factor)


def fiat_to_units(amount: int, currency: str) -> int:
    """``amount`` minor units of ``currency`` (``"usd"``: cents) in budget units, exactly.

    Raises ``policy_refused`` for a currency whose minor unit is not known here.
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ConfigError("an amount is a non-negative int of minor units")
    exponent = FIAT_EXPONENTS.get(currency.upper()) if isinstance(currency, str) else None
    if exponent is None:
        raise PaymentError("policy_refused", f"unknown currency {str(currency)[:12]!r}")
    factor: int = 10 ** (SCALE - exponent)
    return amount * factor


def format_units(units: int, currency: str) -> str:
    """Budget units for people, e.g. ``"0.1 USD"``."""
    return f"{format_amount(units, SCALE)} {currency}"


_AMOUNT_RE = re.compile(
    r"(?P<dollar>\$)?(?P<number>[0-9]+(?:\.[0-9]+)?)(?:\s+(?P<code>[A-Za-z]+))?"
)


def parse_units(price: str | Decimal, currency: str = "USD") -> int:
    """A human amount of ``currency`` in budget units, exactly.

    Accepts ``"$5"`` (``currency`` must be USD), ``"0.10"``, ``"0.10 USD"`` and
    :class:`~decimal.Decimal`. Floats are refused (they are not exact), and so are ints (ambiguous:
    whole currency units or budget units? Use a ``Decimal`` or :class:`Limits`), negatives and
    anything finer than 10**-18.
    """
    if isinstance(price, Decimal):
        value = price
    elif isinstance(price, str):
        match = _AMOUNT_RE.fullmatch(price.strip()) if len(price) <= 120 else None
        if match is None:
            raise ConfigError(f"cannot read amount {price!r}: use '$5', '5.00' or '5 {currency}'")
        if match["dollar"] and match["code"]:
            raise ConfigError(f"amount {price!r} has both '$' and a currency code")
        if match["dollar"] and currency != "USD":
            raise ConfigError(f"amount {price!r} is in dollars but the budget is in {currency}")
        if match["code"] and match["code"].upper() != currency:
            raise ConfigError(f"amount {price!r} is not in {currency}")
        value = Decimal(match["number"])
    else:
        raise ConfigError(
            f"budget amounts must be exact strings like '$5' or Decimals, not {type(price).__name__}"
        )
    if not value.is_finite():
        raise ConfigError(f"amount {price!r} is not a finite number")
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # only NaN and infinities have a str exponent
        raise ConfigError(f"amount {price!r} is not a finite number")
    # Integer arithmetic on the digits: Decimal's own operations round to 28 significant digits.
    mantissa = int("".join(map(str, digits)) or "0")
    if sign and mantissa:
        raise ConfigError(f"amount {price!r} is negative")
    shift = exponent + SCALE
    if mantissa and len(digits) + shift > 120:
        raise ConfigError(f"amount {price!r} is too large")
    factor: int = 10 ** abs(shift)
    if shift >= 0:
        return mantissa * factor
    units, remainder = divmod(mantissa, factor)
    if remainder:
        raise ConfigError(f"amount {price!r} is finer than 10**-{SCALE} {currency}")
    return units


def _exceeded(message: str) -> PaymentError:
    return PaymentError("budget_exceeded", message)


class Budget:
    """Spending limits kept in a SQLite file (mode 0600), safe across threads and processes.

    ``path`` ``None`` keeps the budget in memory (this object only). Time is always a parameter
    (``now``, unix seconds), never read here. A reservation older than ``reservation_ttl``
    seconds (its process crashed) no longer counts. The methods are synchronous: each is one
    short SQLite transaction, fine to call from async code.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        limits: Limits,
        *,
        currency: str = "USD",
        reservation_ttl: int = 900,
    ) -> None:
        if not isinstance(limits, Limits):
            raise ConfigError("limits must be a Limits")
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{1,12}", currency):
            raise ConfigError(f"currency {currency!r} is not a currency code")
        pegs = {asset.peg.upper() for asset in ASSETS if asset.peg is not None}
        if currency.upper() not in FIAT_EXPONENTS and currency.upper() not in pegs:
            # A budget in a unit nothing converts to would refuse every payment, later.
            raise ConfigError(
                f"currency {currency!r} is not one a budget can count in: an ISO 4217 code "
                f"(USD, EUR, ...) or a known asset's peg ({', '.join(sorted(pegs))})"
            )
        if isinstance(reservation_ttl, bool) or not isinstance(reservation_ttl, int):
            raise ConfigError("reservation_ttl must be an int of seconds")
        if reservation_ttl <= 0:
            raise ConfigError("reservation_ttl must be positive")
        self.limits = limits
        self.currency = currency.upper()
        self.reservation_ttl = reservation_ttl
        self._lock = threading.Lock()
        conn = open_database(path, schema=_SCHEMA, version=_SCHEMA_VERSION)
        try:
            self._check_currency(conn)
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    @classmethod
    def from_prices(
        cls,
        path: str | os.PathLike[str] | None,
        *,
        per_request: str | Decimal | None = None,
        per_day: str | Decimal | None = None,
        total: str | Decimal | None = None,
        currency: str = "USD",
        reservation_ttl: int = 900,
    ) -> Budget:
        """A budget with limits written for people: ``Budget.from_prices(path, per_day="$5")``."""
        code = currency.upper()

        def parse(value: str | Decimal | None) -> int | None:
            return None if value is None else parse_units(value, code)

        limits = Limits(parse(per_request), parse(per_day), parse(total))
        return cls(path, limits, currency=code, reservation_ttl=reservation_ttl)

    def __enter__(self) -> Budget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def to_units(self, amount: int, asset: Asset) -> int:
        """``amount`` of ``asset`` in this budget's units; ``policy_refused`` if the asset is not
        pegged to the budget's currency."""
        if asset.peg is None or asset.peg.upper() != self.currency:
            raise PaymentError(
                "policy_refused",
                f"{asset.symbol} on {asset.network} is not pegged to {self.currency}, "
                "the budget's currency",
            )
        return to_units(amount, asset)

    def fiat_units(self, amount: int, currency: str) -> int:
        """``amount`` minor units of ``currency`` in this budget's units; ``policy_refused`` for an
        unknown currency or one other than the budget's."""
        units = fiat_to_units(amount, currency)
        if currency.upper() != self.currency:
            raise PaymentError(
                "policy_refused",
                f"{currency.upper()} is not {self.currency}, the budget's currency",
            )
        return units

    def format(self, units: int) -> str:
        """Budget units for people, e.g. ``"0.1 USD"``."""
        return format_units(units, self.currency)

    def check(self, amount: int, *, asset: Asset, now: int) -> None:
        """Refuse (``budget_exceeded``, as :meth:`reserve` would) a payment of ``amount`` that
        does not fit now; reserves nothing. A cheap look before any work: only :meth:`reserve`
        holds against other processes."""
        units = self.to_units(amount, asset)
        self._refuse_per_request(units)
        self._transaction(lambda conn: self._refuse_over(conn, units, now), write=False)

    def reserve(
        self,
        amount: int,
        *,
        asset: Asset | None = None,
        now: int,
        payee: str = "",
        resource: str = "",
        currency: str | None = None,
        authorization: SentAuthorization | None = None,
    ) -> Reservation:
        """Set aside ``amount`` atomic units of ``asset`` (or, with ``currency`` instead, minor
        units of that fiat currency: a card payment) for one payment.

        With ``authorization`` (already signed, about to be sent) the reservation is born as
        :meth:`sent` makes it, in the same transaction: spent, its authorization outstanding.

        Raises :class:`~farebox.errors.PaymentError` ``budget_exceeded`` naming the limit that
        refuses and what it still allows, or ``policy_refused`` for an asset or currency other than
        the budget's.
        """
        if (asset is None) == (currency is None):
            raise ConfigError("reserve takes either an asset or a fiat currency")
        if asset is not None:
            units = self.to_units(amount, asset)
            label = asset.caip19
        else:
            assert currency is not None
            units = self.fiat_units(amount, currency)
            # Kept in the asset column (its schema is unchanged): ISO 4217 in CAIP-19's style.
            label = f"iso4217:{currency.upper()}"
        self._refuse_per_request(units)
        reservation = Reservation(
            id=secrets.token_hex(16),
            amount=units,
            asset=label,
            asset_amount=amount,
            at=now,
            day=now // DAY,
            payee=payee,
            resource=resource,
        )

        def run(conn: sqlite3.Connection) -> None:
            self._refuse_over(conn, units, now)
            conn.execute(
                "INSERT INTO reservations (id, amount, day, at, state, asset, asset_amount, "
                "payee, resource) VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                (
                    reservation.id,
                    str(units),
                    reservation.day,
                    now,
                    reservation.asset,
                    str(amount),
                    payee,
                    resource,
                ),
            )
            if authorization is not None:
                self._sent(conn, reservation.id, now=now, authorization=authorization)

        self._transaction(run)
        return reservation

    def commit(self, reservation: Reservation, *, now: int, reference: str | None = None) -> None:
        """The money moved: ``reservation`` is spent (on the day it was reserved).

        Committing twice changes nothing, except that a ``reference`` given later is kept when
        there was none; committing an authorization that :meth:`sent` left outstanding settles it
        (a success answer named its transaction). A released or expired reservation is still
        committed: once money moved, it counts, whatever the limits say.
        """

        def run(conn: sqlite3.Connection) -> None:
            self._commit(conn, reservation.id, now=now, reference=reference)
            conn.execute(
                "UPDATE authorizations SET state = 'settled', transaction_hash = ?, "
                "resolved_at = ? WHERE reservation = ? AND state = 'outstanding'",
                (reference, now, reservation.id),
            )

        self._transaction(run)

    def sent(self, reservation: Reservation, *, now: int, authorization: SentAuthorization) -> None:
        """A signed ``authorization`` paying ``reservation`` is about to leave the agent: from
        now on it counts as spent, and stays *outstanding* until a success answer
        (:meth:`commit`) or the chain (:meth:`resolve`) says what became of it.

        Call it before the authorization is sent: a process killed after sending must leave it
        counted, never as an active reservation that expires while the authorization is valid.
        """

        self._transaction(
            lambda conn: self._sent(conn, reservation.id, now=now, authorization=authorization)
        )

    def outstanding(self, *, limit: int | None = None) -> list[Outstanding]:
        """The authorizations that left the agent and may still move money, oldest first."""
        sql = (
            "SELECT r.id, r.amount, r.asset, r.asset_amount, r.at, r.payee, r.resource, "
            "a.network, a.token, a.authorizer, a.nonce, a.valid_before "
            "FROM authorizations a JOIN reservations r ON r.id = a.reservation "
            "WHERE a.state = 'outstanding' ORDER BY a.valid_before, a.rowid"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"

        def run(conn: sqlite3.Connection) -> list[Outstanding]:
            return [
                Outstanding(
                    reservation=row[0],
                    amount=int(row[1]),
                    asset=row[2],
                    asset_amount=int(row[3]),
                    at=row[4],
                    payee=row[5],
                    resource=row[6],
                    authorization=SentAuthorization(row[7], row[8], row[9], row[10], row[11]),
                )
                for row in conn.execute(sql)
            ]

        return self._transaction(run, write=False)

    def resolve(
        self, reservation: str, outcome: str, *, now: int, transaction: str | None = None
    ) -> bool:
        """Record what the chain says became of an outstanding authorization: ``"used"`` (it
        moved money: it stays spent, with its ``transaction``), or ``"cancelled"`` /
        ``"expired"`` (it never can: the payment no longer counts). Returns whether it was
        outstanding; a resolved one is never changed again, so racing reconcilers agree.
        """
        if outcome not in OUTCOMES:
            raise ConfigError(f"outcome must be one of {OUTCOMES}")

        def run(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "UPDATE authorizations SET state = ?, transaction_hash = ?, resolved_at = ? "
                "WHERE reservation = ? AND state = 'outstanding'",
                (outcome, transaction, now, reservation),
            ).rowcount
            if not changed:
                return False
            if outcome == "used":
                conn.execute(
                    "UPDATE reservations SET reference = ? WHERE id = ?",
                    (transaction, reservation),
                )
                return True
            row = conn.execute(
                "SELECT amount, day FROM reservations WHERE id = ? AND state = 'committed'",
                (reservation,),
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE reservations SET state = 'released' WHERE id = ?", (reservation,)
                )
                self._add_committed(conn, row[1], -int(row[0]))
            return True

        return self._transaction(run)

    def release(self, reservation: Reservation) -> None:
        """Nothing was spent: ``reservation`` no longer counts.

        Releasing twice, or releasing a committed reservation, changes nothing (so a ``finally``
        that releases after a commit is harmless).
        """

        def run(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT state FROM reservations WHERE id = ?", (reservation.id,)
            ).fetchone()
            if row is None:
                raise ConfigError("unknown reservation (from another budget?)")
            if row[0] == "active":
                conn.execute(
                    "UPDATE reservations SET state = 'released' WHERE id = ?", (reservation.id,)
                )

        self._transaction(run)

    def spent(self, *, now: int) -> Spending:
        """Today's (UTC) and total committed and reserved amounts, and what of the committed
        total outstanding authorizations hold."""

        def run(conn: sqlite3.Connection) -> Spending:
            spending = self._spending(conn, now)
            count, held = self._held(conn)
            return replace(spending, outstanding=held, outstanding_count=count)

        return self._transaction(run, write=False)

    def close(self) -> None:
        """Close the file; later calls raise ``store_unavailable``."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # --- inside a transaction ------------------------------------------------------------------

    def _commit(
        self, conn: sqlite3.Connection, reservation: str, *, now: int, reference: str | None
    ) -> None:
        row = conn.execute(
            "SELECT state, amount, day FROM reservations WHERE id = ?", (reservation,)
        ).fetchone()
        if row is None:
            raise ConfigError("unknown reservation (from another budget?)")
        state, amount, day = row
        if state == "committed":
            if reference is not None:
                conn.execute(
                    "UPDATE reservations SET reference = ? WHERE id = ? AND reference IS NULL",
                    (reference, reservation),
                )
            return
        conn.execute(
            "UPDATE reservations SET state = 'committed', settled_at = ?, reference = ? "
            "WHERE id = ?",
            (now, reference, reservation),
        )
        self._add_committed(conn, day, int(amount))

    def _sent(
        self,
        conn: sqlite3.Connection,
        reservation: str,
        *,
        now: int,
        authorization: SentAuthorization,
    ) -> None:
        self._commit(conn, reservation, now=now, reference=None)
        conn.execute(
            "INSERT INTO authorizations (reservation, network, token, authorizer, nonce, "
            "valid_before, state) VALUES (?, ?, ?, ?, ?, ?, 'outstanding') "
            "ON CONFLICT (reservation) DO NOTHING",
            (
                reservation,
                authorization.network,
                authorization.token.lower(),
                authorization.authorizer.lower(),
                authorization.nonce.lower(),
                authorization.valid_before,
            ),
        )

    @staticmethod
    def _add_committed(conn: sqlite3.Connection, day: int, delta: int) -> None:
        for period in (day, _ALL_TIME):
            found = conn.execute(
                "SELECT amount FROM committed WHERE period = ?", (period,)
            ).fetchone()
            new = (int(found[0]) if found else 0) + delta
            conn.execute(
                "INSERT INTO committed (period, amount) VALUES (?, ?) "
                "ON CONFLICT (period) DO UPDATE SET amount = excluded.amount",
                (period, str(new)),
            )

    @staticmethod
    def _held(conn: sqlite3.Connection) -> tuple[int, int]:
        """How many outstanding authorizations there are and what they hold, in budget units."""
        count = held = 0
        for (amount,) in conn.execute(
            "SELECT r.amount FROM authorizations a JOIN reservations r ON r.id = a.reservation "
            "WHERE a.state = 'outstanding'"
        ):
            count += 1
            held += int(amount)
        return count, held

    def _refuse_per_request(self, units: int) -> None:
        per_request = self.limits.per_request
        if per_request is not None and units > per_request:
            raise _exceeded(
                f"this payment of {self.format(units)} is over the per-request limit of "
                f"{self.format(per_request)}"
            )

    def _refuse_over(self, conn: sqlite3.Connection, units: int, now: int) -> None:
        limits = self.limits
        spending = self._spending(conn, now)
        if limits.per_day is not None and spending.today + units > limits.per_day:
            left = self.format(max(0, limits.per_day - spending.today))
            raise _exceeded(
                f"this payment of {self.format(units)} is over the daily limit of "
                f"{self.format(limits.per_day)}: {left} left today (UTC)" + self._held_note(conn)
            )
        if limits.total is not None and spending.total + units > limits.total:
            left = self.format(max(0, limits.total - spending.total))
            raise _exceeded(
                f"this payment of {self.format(units)} is over the total limit of "
                f"{self.format(limits.total)}: {left} left" + self._held_note(conn)
            )

    def _held_note(self, conn: sqlite3.Connection) -> str:
        count, held = self._held(conn)
        if not count:
            return ""
        return (
            f"; {count} signed authorization(s) for {self.format(held)} in all (any day) left "
            "the agent without proof of settlement: they count until the chain shows them "
            "expired unused or cancelled (farebox budget reconcile)"
        )

    def _check_currency(self, conn: sqlite3.Connection) -> None:
        # A budget file counts in one currency for life: reopening it in another would compare
        # dollars with euros.
        try:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('currency', ?) ON CONFLICT DO NOTHING",
                (self.currency,),
            )
            (stored,) = conn.execute("SELECT value FROM meta WHERE key = 'currency'").fetchone()
        except sqlite3.Error as exc:
            raise _unavailable() from exc
        if stored != self.currency:
            raise ConfigError(f"this budget file counts in {stored}, not {self.currency}")

    def _spending(self, conn: sqlite3.Connection, now: int) -> Spending:
        day = now // DAY
        committed = dict(
            conn.execute(
                "SELECT period, amount FROM committed WHERE period IN (?, ?)", (day, _ALL_TIME)
            ).fetchall()
        )
        today_reserved = total_reserved = 0
        for reserved_day, amount in conn.execute(
            "SELECT day, amount FROM reservations WHERE state = 'active' AND at > ?",
            (now - self.reservation_ttl,),
        ):
            total_reserved += int(amount)
            if reserved_day == day:
                today_reserved += int(amount)
        return Spending(
            currency=self.currency,
            day=day,
            today_committed=int(committed.get(day, 0)),
            today_reserved=today_reserved,
            total_committed=int(committed.get(_ALL_TIME, 0)),
            total_reserved=total_reserved,
            limits=self.limits,
        )

    def _transaction(self, run: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise PaymentError("store_unavailable", "the budget is closed")
            try:
                # IMMEDIATE takes the write lock before reading, so no other process can spend
                # between our sums and our insert.
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = run(conn)
                    conn.execute("COMMIT")
                    return result
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise _unavailable() from exc


def _unavailable() -> PaymentError:
    return PaymentError("store_unavailable", "the agent's budget file is unavailable")
