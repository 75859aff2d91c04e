"""The ledger core on the real database: grants, deductions, limits, periods, and the audit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select, update

from app.billing.subscriptions import ensure_customer
from app.catalogue import EntitlementSpec
from app.db import Database
from app.ledger.amounts import AmountError, format_atoms, to_atoms
from app.ledger.audit import verify
from app.ledger.errors import InsufficientCredits, LimitExceeded
from app.ledger.posting import Source
from app.ledger.service import (
    PeriodTerms,
    deduct,
    expire_all_due,
    grant,
    lock_balance,
    start_period,
    sync_entitlement,
)
from app.models import Balance, Grant, LedgerEntry

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def setup_balance(
    db: Database, *, overage_enabled: bool = True, overage_limit: Decimal | None = None, precision: int = 0
) -> None:
    with db.write() as session:
        ensure_customer(session, "cus_l", "stripe")
        sync_entitlement(
            session,
            EntitlementSpec(
                id="credits",
                name="Credits",
                unit="credit",
                precision=precision,
                overage_enabled=overage_enabled,
                overage_limit=overage_limit,
            ),
        )
        lock_balance(session, "cus_l", "credits")


def snapshot(db: Database) -> tuple[int, int, list[tuple[str, int]]]:
    with db.read() as session:
        balance = session.execute(select(Balance)).scalar_one()
        kinds = session.execute(select(LedgerEntry.kind, LedgerEntry.amount).order_by(LedgerEntry.id)).all()
        return balance.balance, balance.overage, [tuple(k) for k in kinds]


def test_a_grant_counts_once_per_source(db):
    setup_balance(db)
    for _ in range(3):
        with db.write() as session:
            grant(
                session,
                lock_balance(session, "cus_l", "credits"),
                100,
                source_key="promo-1",
                starts_at=T0,
                expires_at=None,
            )
    assert snapshot(db) == (100, 0, [("grant", 100)])


def test_deductions_take_the_oldest_grant_first_then_overage(db):
    setup_balance(db, overage_limit=Decimal(50))
    with db.write() as session:
        balance = lock_balance(session, "cus_l", "credits")
        grant(session, balance, 30, source_key="newer", starts_at=T0 + timedelta(days=1), expires_at=None)
        grant(session, balance, 20, source_key="older", starts_at=T0, expires_at=None)
        deduct(session, balance, 25, source=Source(dedupe_key="u1"), now=T0 + timedelta(days=2))
    with db.read() as session:
        remaining = dict(session.execute(select(Grant.source_key, Grant.remaining)).all())
    assert remaining == {"older": 0, "newer": 25}
    with db.write() as session:
        deduct(
            session,
            lock_balance(session, "cus_l", "credits"),
            60,
            source=Source(dedupe_key="u2"),
            now=T0 + timedelta(days=2),
        )
    assert snapshot(db)[:2] == (0, 35)  # 25 from the balance, 35 into overage


def test_a_deduction_past_the_overage_limit_is_refused_whole(db):
    setup_balance(db, overage_limit=Decimal(10))
    with db.write() as session:
        grant(session, lock_balance(session, "cus_l", "credits"), 5, source_key="g", starts_at=T0, expires_at=None)
    before = snapshot(db)
    with pytest.raises(LimitExceeded), db.write() as session:
        deduct(session, lock_balance(session, "cus_l", "credits"), 16, source=Source(dedupe_key="big"), now=T0)
    assert snapshot(db) == before
    with db.write() as session:  # exactly up to the limit is fine
        deduct(session, lock_balance(session, "cus_l", "credits"), 15, source=Source(dedupe_key="fits"), now=T0)
    assert snapshot(db)[:2] == (0, 10)


def test_with_overage_disabled_the_balance_never_goes_below_zero(db):
    setup_balance(db, overage_enabled=False)
    with db.write() as session:
        grant(session, lock_balance(session, "cus_l", "credits"), 5, source_key="g", starts_at=T0, expires_at=None)
    with pytest.raises(InsufficientCredits), db.write() as session:
        deduct(session, lock_balance(session, "cus_l", "credits"), 6, source=Source(dedupe_key="x"), now=T0)
    assert snapshot(db)[:2] == (5, 0)


def test_a_period_rollover_expires_the_old_grant_and_resets_overage(db):
    setup_balance(db)
    first = PeriodTerms(
        "sub_l",
        "basic",
        T0,
        T0 + timedelta(days=30),
        included=100,
        hard_cap=150,
        overage_enabled=True,
        overage_limit=50,
    )
    second = PeriodTerms(
        "sub_l",
        "basic",
        T0 + timedelta(days=30),
        T0 + timedelta(days=60),
        included=100,
        hard_cap=150,
        overage_enabled=True,
        overage_limit=50,
    )
    with db.write() as session:
        balance = lock_balance(session, "cus_l", "credits")
        assert start_period(session, balance, first)
        deduct(session, balance, 120, source=Source(dedupe_key="use"), now=T0 + timedelta(days=1))
        with pytest.raises(LimitExceeded):  # the hard cap: 150 per period
            deduct(session, balance, 31, source=Source(dedupe_key="too-much"), now=T0 + timedelta(days=1))
    with db.write() as session:
        balance = lock_balance(session, "cus_l", "credits")
        assert start_period(session, balance, second)
        assert not start_period(session, balance, second)  # repeated: nothing
        assert not start_period(session, balance, first)  # older: nothing
    assert snapshot(db) == (100, 0, [("grant", 100), ("deduction", -120), ("overage_reset", 20), ("grant", 100)])
    with db.read() as session:
        assert session.execute(select(Balance.period_used)).scalar_one() == 0
        assert verify(session) == []


def test_the_clock_expires_ended_periods(db):
    setup_balance(db)
    with db.write() as session:
        start_period(
            session,
            lock_balance(session, "cus_l", "credits"),
            PeriodTerms(
                "sub_l",
                "basic",
                T0,
                T0 + timedelta(days=30),
                included=100,
                hard_cap=None,
                overage_enabled=True,
                overage_limit=None,
            ),
        )
    with db.write() as session:
        assert expire_all_due(session, now=T0 + timedelta(days=10)) == 0
    with db.write() as session:
        assert expire_all_due(session, now=T0 + timedelta(days=31)) == 1
    with db.write() as session:
        assert expire_all_due(session, now=T0 + timedelta(days=32)) == 0
    assert snapshot(db) == (0, 0, [("grant", 100), ("expiry", -100)])


def test_verify_finds_a_tampered_balance_and_a_broken_chain(db):
    setup_balance(db)
    with db.write() as session:
        balance = lock_balance(session, "cus_l", "credits")
        grant(session, balance, 100, source_key="a", starts_at=T0, expires_at=None)
        deduct(session, balance, 10, source=Source(dedupe_key="b"), now=T0)
    with db.read() as session:
        assert verify(session) == []
    with db.write() as session:
        session.execute(update(Balance).values(balance=Balance.balance + 1))
    with db.read() as session:
        problems = verify(session)
    assert any("entries sum to 90" in line for line in problems)
    with db.write() as session:
        session.execute(update(Balance).values(balance=Balance.balance - 1))
        session.execute(update(LedgerEntry).where(LedgerEntry.kind == "deduction").values(balance_before=99))
    with db.read() as session:
        assert any("previous entry ended at (100, 0)" in line for line in verify(session))
    with db.write() as session:
        session.execute(update(LedgerEntry).where(LedgerEntry.kind == "deduction").values(balance_before=100))
        session.execute(update(Grant).values(remaining=Grant.remaining + 5))
    with db.read() as session:
        assert verify(session) == ["balance 1 (cus_l/credits): balance 90 but its unexpired grants hold 95"]


def test_ten_decimal_places_stay_exact(db):
    setup_balance(db, precision=10)
    amount = to_atoms(Decimal("0.1000000001"), 10)
    with db.write() as session:
        balance = lock_balance(session, "cus_l", "credits")
        for n in range(3):
            grant(session, balance, amount, source_key=f"tiny-{n}", starts_at=T0, expires_at=None)
    with db.read() as session:
        atoms = session.execute(select(Balance.balance)).scalar_one()
    assert format_atoms(atoms, 10) == "0.3000000003"


@pytest.mark.parametrize("bad", ["1.5", "-0.001", "abc", "NaN", "Infinity", 1.5, True, None])
def test_amounts_that_cannot_be_exact_are_refused(bad):
    with pytest.raises(AmountError):
        to_atoms(bad, 2 if bad != "1.5" else 0)
