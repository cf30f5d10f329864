from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farebox.agent.budget import (
    SCALE,
    Budget,
    Limits,
    SentAuthorization,
    Spending,
    format_units,
    parse_units,
    to_units,
)
from farebox.errors import ConfigError, PaymentError
from farebox.money import BASE_SEPOLIA_USDC, Asset, format_amount

USDC = BASE_SEPOLIA_USDC  # 6 decimals, pegged to USD
CENT = 10_000  # one cent of USDC in atomic units
DAY = 86_400
T0 = 1_700_000_000 - 1_700_000_000 % DAY  # a UTC midnight
ADDRESS = "0x" + "11" * 20


def usd(text: str) -> int:
    return parse_units(text, "USD")


def asset(decimals: int = 6, peg: str | None = "USD") -> Asset:
    return Asset("eip155:84532", ADDRESS, decimals, "TOK", "Token", "1", peg)


def exceeded(budget: Budget, amount: int, now: int) -> PaymentError:
    with pytest.raises(PaymentError) as refused:
        budget.reserve(amount, asset=USDC, now=now)
    assert refused.value.code == "budget_exceeded"
    return refused.value


def test_per_request_limit() -> None:
    with Budget.from_prices(None, per_request="$0.10") as budget:
        budget.reserve(10 * CENT, asset=USDC, now=T0)  # exactly the limit is fine
        error = exceeded(budget, 10 * CENT + 1, T0)
        assert "per-request limit of 0.1 USD" in error.message
        assert "0.100001 USD" in error.message


def test_per_day_limit_rolls_over_at_utc_midnight() -> None:
    evening = T0 + DAY - 100
    with Budget.from_prices(None, per_day="$0.25") as budget:
        first = budget.reserve(10 * CENT, asset=USDC, now=evening)
        budget.commit(first, now=evening + 1)
        budget.reserve(10 * CENT, asset=USDC, now=evening + 2)  # reserved, not committed: counts
        error = exceeded(budget, 10 * CENT, evening + 3)
        assert "daily limit of 0.25 USD: 0.05 USD left today" in error.message
        budget.reserve(5 * CENT, asset=USDC, now=evening + 4)
        exceeded(budget, 1, T0 + DAY - 1)
        # A new UTC day: yesterday's spending no longer counts against the daily limit.
        budget.reserve(25 * CENT, asset=USDC, now=T0 + DAY)
        exceeded(budget, 1, T0 + DAY)
        spent = budget.spent(now=T0 + DAY)
        assert (spent.today_committed, spent.today_reserved) == (0, usd("0.25"))
        assert spent.total == usd("0.50")  # yesterday's reservations are still active
        assert spent.remaining_today == 0
        assert spent.remaining_total is None


def test_total_limit() -> None:
    with Budget.from_prices(None, total="$0.30") as budget:
        for day in range(3):
            budget.commit(budget.reserve(10 * CENT, asset=USDC, now=T0 + day * DAY), now=T0)
        error = exceeded(budget, 1, T0 + 5 * DAY)
        assert "total limit of 0.3 USD: 0 USD left" in error.message


def test_commit_and_release_accounting() -> None:
    with Budget(None, Limits(per_day=usd("1"), total=usd("2"))) as budget:
        a = budget.reserve(20 * CENT, asset=USDC, now=T0, payee=ADDRESS, resource="https://x/y")
        b = budget.reserve(30 * CENT, asset=USDC, now=T0)
        assert (a.amount, a.asset_amount, a.day, a.payee) == (
            usd("0.2"),
            20 * CENT,
            T0 // DAY,
            ADDRESS,
        )
        assert a.id != b.id
        assert budget.spent(now=T0) == Spending(
            "USD", T0 // DAY, 0, usd("0.5"), 0, usd("0.5"), budget.limits
        )
        budget.commit(a, now=T0 + 1, reference="0xtx")
        budget.commit(a, now=T0 + 2)  # twice changes nothing
        budget.release(b)
        budget.release(b)
        budget.release(a)  # a committed reservation stays committed
        spent = budget.spent(now=T0 + 3)
        assert (spent.today_committed, spent.today_reserved) == (usd("0.2"), 0)
        assert (spent.total_committed, spent.total_reserved) == (usd("0.2"), 0)
        assert spent.remaining_today == usd("0.8")
        assert spent.remaining_total == usd("1.8")
        # Money that moved after all is counted even though the reservation was released.
        budget.commit(b, now=T0 + 4)
        assert budget.spent(now=T0 + 4).today_committed == usd("0.5")


def test_a_reservation_counts_on_its_own_day() -> None:
    with Budget(None, Limits(per_day=usd("1"))) as budget:
        late = budget.reserve(60 * CENT, asset=USDC, now=T0 + DAY - 5)
        budget.commit(late, now=T0 + DAY + 5)  # committed after midnight
        assert budget.spent(now=T0 + DAY + 5).today == 0
        assert budget.spent(now=T0 + DAY - 1).today == usd("0.6")


def test_an_expired_reservation_stops_counting() -> None:
    with Budget.from_prices(None, per_day="$0.10", reservation_ttl=60) as budget:
        crashed = budget.reserve(10 * CENT, asset=USDC, now=T0)
        exceeded(budget, CENT, T0 + 59)
        assert budget.spent(now=T0 + 59).today_reserved == usd("0.1")
        assert budget.spent(now=T0 + 60).today_reserved == 0
        budget.reserve(10 * CENT, asset=USDC, now=T0 + 60)
        # If the crashed payment did move money after all, it still counts once committed.
        budget.commit(crashed, now=T0 + 61)
        assert budget.spent(now=T0 + 61).today == usd("0.2")


def test_unknown_reservations_are_refused() -> None:
    with Budget(None, Limits()) as one, Budget(None, Limits()) as two:
        foreign = one.reserve(CENT, asset=USDC, now=T0)
        with pytest.raises(ConfigError):
            two.commit(foreign, now=T0)
        with pytest.raises(ConfigError):
            two.release(foreign)


def test_an_asset_in_another_currency_is_refused() -> None:
    with Budget(None, Limits()) as budget:
        for other in (asset(18, None), asset(2, "EUR")):
            with pytest.raises(PaymentError) as refused:
                budget.reserve(1, asset=other, now=T0)
            assert refused.value.code == "policy_refused"
            assert "not pegged to USD" in refused.value.message
    with Budget(None, Limits(), currency="eur") as euros:
        assert euros.currency == "EUR"
        euros.reserve(1, asset=asset(2, "EUR"), now=T0)
        with pytest.raises(PaymentError):
            euros.reserve(1, asset=USDC, now=T0)


def test_to_units_examples() -> None:
    assert to_units(1, USDC) == 10**12
    assert to_units(10_000, USDC) == usd("$0.01")
    assert to_units(1, asset(18)) == 1
    assert to_units(2**256 - 1, asset(0)) == (2**256 - 1) * 10**18
    # Finer than the budget's scale: rounded up, never down.
    assert to_units(1, asset(20)) == 1
    assert to_units(100, asset(20)) == 1
    assert to_units(101, asset(20)) == 2
    assert to_units(0, asset(20)) == 0
    for bad in (-1, True, 1.0):
        with pytest.raises(ConfigError):
            to_units(bad, USDC)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=2**256 - 1), st.integers(min_value=0, max_value=18))
def test_to_units_never_loses_precision(amount: int, decimals: int) -> None:
    units = to_units(amount, asset(decimals))
    assert format_amount(units, SCALE) == format_amount(amount, decimals)
    assert units // 10 ** (SCALE - decimals) == amount
    assert units % 10 ** (SCALE - decimals) == 0


@given(st.integers(min_value=0, max_value=2**256 - 1), st.integers(min_value=19, max_value=36))
def test_finer_assets_round_up_by_less_than_a_unit(amount: int, decimals: int) -> None:
    units = to_units(amount, asset(decimals))
    step = 10 ** (decimals - SCALE)
    assert units * step >= amount > (units - 1) * step


@given(st.integers(min_value=0, max_value=10**40))
def test_parse_units_is_exact(units: int) -> None:
    text = format_amount(units, SCALE)
    assert parse_units(text) == units
    assert parse_units(f"${text}") == units
    assert parse_units(f"{text} usd") == units
    assert parse_units(Decimal(text)) == units
    assert format_units(units, "USD") == f"{text} USD"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (0.1, "exact"),
        (5, "exact"),
        (True, "exact"),
        ("five dollars", "cannot read"),
        ("-1", "cannot read"),
        ("$-1", "cannot read"),
        ("1e3", "cannot read"),
        ("1,000", "cannot read"),
        ("", "cannot read"),
        ("9" * 200, "cannot read"),
        ("$1 USD", "both"),
        ("1 EUR", "not in USD"),
        ("0.0000000000000000001", "finer than"),
        (Decimal("-1"), "negative"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        (Decimal("1e200"), "too large"),
    ],
)
def test_from_prices_refuses_inexact_or_unreadable_amounts(value: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        Budget.from_prices(None, per_day=value)  # type: ignore[arg-type]


def test_from_prices_reads_people_amounts() -> None:
    budget = Budget.from_prices(None, per_request="$0.10", per_day="5", total=Decimal("20.5"))
    assert budget.limits == Limits(usd("0.1"), 5 * 10**18, 205 * 10**17)
    budget.close()
    with pytest.raises(ConfigError, match="dollars"):
        Budget.from_prices(None, per_day="$5", currency="EUR")
    euros = Budget.from_prices(None, per_day="5 eur", currency="EUR")
    assert euros.limits.per_day == 5 * 10**18
    euros.close()


@pytest.mark.parametrize(
    "limits",
    [
        {"per_day": -1},
        {"total": 1.5},
        {"per_request": True},
        {"per_request": "5"},
    ],
)
def test_limits_are_non_negative_ints(limits: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Limits(**limits)  # type: ignore[arg-type]


def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Budget(None, Limits(), reservation_ttl=0)
    with pytest.raises(ConfigError):
        Budget(None, Limits(), currency="US Dollar")
    with pytest.raises(ConfigError):
        Budget(None, {"per_day": 1})  # type: ignore[arg-type]
    Budget(tmp_path / "b.db", Limits()).close()
    with pytest.raises(ConfigError, match="counts in USD"):
        Budget(tmp_path / "b.db", Limits(), currency="EUR")


def test_the_file_is_private_persistent_and_closable(tmp_path: Path) -> None:
    path = tmp_path / "new" / "budget.db"
    with Budget.from_prices(path, per_day="$1") as budget:
        budget.commit(budget.reserve(40 * CENT, asset=USDC, now=T0), now=T0)
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
            assert mode & 0o077 == 0, (suffix, oct(mode))
    with pytest.raises(PaymentError) as closed:
        budget.spent(now=T0)
    assert closed.value.code == "store_unavailable"
    with Budget.from_prices(path, per_day="$0.50") as again:
        assert again.spent(now=T0).today_committed == usd("0.4")
        exceeded(again, 10 * CENT + 1, T0)


def test_an_unusable_file_is_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "private-name"
    blocker.write_text("not a directory")
    with pytest.raises(PaymentError) as failed:
        Budget(blocker / "budget.db", Limits())
    assert failed.value.code == "store_unavailable"
    assert "private-name" not in failed.value.message


CHILD = textwrap.dedent(
    """
    import sys
    from farebox.agent.budget import Budget
    from farebox.errors import PaymentError
    from farebox.money import BASE_SEPOLIA_USDC

    budget = Budget.from_prices(sys.argv[1], per_day="$1.00")
    print("ready", flush=True)
    sys.stdin.readline()
    won = 0
    for n in range(20):
        try:
            reservation = budget.reserve(100_000, asset=BASE_SEPOLIA_USDC, now=int(sys.argv[2]))
        except PaymentError as exc:
            assert exc.code == "budget_exceeded", exc
            continue
        won += 1
        if n % 2:
            budget.commit(reservation, now=int(sys.argv[2]))
    budget.close()
    print(won, flush=True)
    """
)


def test_two_processes_never_exceed_the_daily_limit_together(tmp_path: Path) -> None:
    path = str(tmp_path / "budget.db")
    Budget.from_prices(path, per_day="$1.00").close()  # create the schema once, before the race
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, path, str(T0)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for child in children:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    won = 0
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        won += json.loads(out)
    assert won == 10  # $1.00 a day at $0.10 each, over 40 attempts
    with Budget.from_prices(path, per_day="$1.00") as budget:
        assert budget.spent(now=T0).today == usd("1")


def authorization(nonce: int, valid_before: int = T0 + 300) -> SentAuthorization:
    return SentAuthorization(
        "eip155:84532", USDC.address, ADDRESS, "0x" + nonce.to_bytes(32, "big").hex(), valid_before
    )


def test_a_sent_authorization_counts_until_resolved() -> None:
    with Budget.from_prices(None, per_day="$0.03") as budget:
        a = budget.reserve(CENT, asset=USDC, now=T0, payee=ADDRESS, resource="https://x/a")
        budget.sent(a, now=T0, authorization=authorization(1))
        b = budget.reserve(CENT, asset=USDC, now=T0)
        budget.sent(b, now=T0, authorization=authorization(2))
        c = budget.reserve(CENT, asset=USDC, now=T0)
        budget.sent(c, now=T0, authorization=authorization(3))
        exceeded_while_held = exceeded(budget, 1, T0 + 10)
        assert "3 signed authorization(s) for 0.03 USD" in exceeded_while_held.message
        # Long after a reservation's time to live, the sent ones still count: they are spent.
        spent = budget.spent(now=T0 + 3600)
        assert (spent.today_committed, spent.outstanding_count) == (usd("0.03"), 3)
        assert [o.reservation for o in budget.outstanding()] == [a.id, b.id, c.id]
        assert budget.outstanding()[0].resource == "https://x/a"

        budget.commit(a, now=T0 + 1, reference="0xtx")  # a success answer: settled for good
        assert budget.resolve(b.id, "expired", now=T0 + 400)  # never moved: released
        assert budget.resolve(c.id, "used", now=T0 + 400, transaction="0xc")
        assert not budget.resolve(b.id, "used", now=T0 + 500)  # resolved once, never again
        assert not budget.resolve(a.id, "expired", now=T0 + 500)  # a settled one is final
        spent = budget.spent(now=T0 + 3600)
        assert (spent.today_committed, spent.total_committed) == (usd("0.02"), usd("0.02"))
        assert (spent.outstanding_count, spent.outstanding) == (0, 0)
        budget.reserve(CENT, asset=USDC, now=T0 + 3600)  # the released cent is spendable again
        with pytest.raises(ConfigError):
            budget.resolve(a.id, "refunded", now=T0)


def test_a_version_1_budget_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Budget.from_prices(path, per_day="$1") as budget:
        budget.commit(budget.reserve(CENT, asset=USDC, now=T0), now=T0)
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE authorizations")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Budget.from_prices(path, per_day="$1") as budget:
        assert budget.spent(now=T0).today_committed == CENT * 10**12
        sent = budget.reserve(CENT, asset=USDC, now=T0)
        budget.sent(sent, now=T0, authorization=authorization(7))
        assert budget.spent(now=T0).outstanding_count == 1


@pytest.mark.parametrize("currency", ["USDC", "XYZ"])
def test_a_currency_nothing_converts_to_is_refused_when_built(currency: str) -> None:
    # Before, such a budget was built and then refused every payment ("not pegged to USDC").
    with pytest.raises(ConfigError, match="not one a budget can count in"):
        Budget.from_prices(None, per_day="5", currency=currency)
    Budget.from_prices(None, per_day="5", currency="eur").close()
