"""Ledger operations on Tally-kept balances, under the balance's row lock; they write through `posting`.

Rules, after TigerBeetle's transfers:
- a cause (a grant's source, a usage event, an API idempotency key, a provider ledger entry) is a
  unique `dedupe_key`, so applying the same cause twice is a no-op that returns the first entry;
- a deduction takes from the balance first, oldest grant first, then accrues overage if enabled; one
  that would pass a limit is refused whole and writes nothing;
- `amount` is the change of the net position (balance - overage), so sums and chains can be audited.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.catalogue import EntitlementSpec
from app.db import insert_ignoring_conflicts, utcnow
from app.ledger.amounts import to_atoms
from app.ledger.errors import InsufficientCredits, LedgerError, LimitExceeded, ProviderManaged, UnknownBalance
from app.ledger.limits import deduction_refusal
from app.ledger.posting import Posting, Source, post_one
from app.models import Balance, CreditEntitlement, Grant, LedgerEntry

# --- entitlements and balances -------------------------------------------------------------------


def sync_entitlement(session: Session, spec: EntitlementSpec) -> CreditEntitlement:
    """Create or update a Tally-native entitlement from its catalogue declaration."""
    entitlement = session.get(CreditEntitlement, spec.id)
    if entitlement is None:
        values = {"id": spec.id, "managed_by": "tally", "name": spec.name, "unit": spec.unit}
        insert_ignoring_conflicts(session, CreditEntitlement, {**values, "precision": spec.precision})
        entitlement = session.get(CreditEntitlement, spec.id, populate_existing=True)
        assert entitlement is not None
    if entitlement.managed_by != "tally":
        raise ProviderManaged(f"entitlement {spec.id!r} is managed by {entitlement.managed_by}")
    if entitlement.precision != spec.precision and entitlement_has_entries(session, spec.id):
        raise LedgerError(f"entitlement {spec.id!r}: precision cannot change once it has ledger entries")
    entitlement.name, entitlement.unit, entitlement.precision = spec.name, spec.unit, spec.precision
    entitlement.overage_enabled = spec.overage_enabled
    entitlement.overage_limit = None if spec.overage_limit is None else to_atoms(spec.overage_limit, spec.precision)
    return entitlement


def entitlement_has_entries(session: Session, entitlement_id: str) -> bool:
    query = select(LedgerEntry.id).join(Balance).where(Balance.entitlement_id == entitlement_id).limit(1)
    return session.execute(query).first() is not None


def lock_balance(session: Session, customer_id: str, entitlement_id: str, *, create: bool = True) -> Balance:
    """The balance row, locked for this transaction (FOR UPDATE on PostgreSQL; SQLite locks the file).

    The lock is tried first: a balance exists far more often than not, and creating one costs two
    statements more. `create` makes a missing one (the unique key absorbs a concurrent creation).
    """
    query = (
        select(Balance)
        .where(Balance.customer_id == customer_id, Balance.entitlement_id == entitlement_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    balance = session.execute(query).scalar_one_or_none()
    if balance is None and create:
        entitlement = session.get(CreditEntitlement, entitlement_id)
        if entitlement is None:
            raise UnknownBalance(f"no credit entitlement {entitlement_id!r}")
        insert_ignoring_conflicts(
            session,
            Balance,
            {
                "customer_id": customer_id,
                "entitlement_id": entitlement_id,
                "overage_enabled": entitlement.overage_enabled,
                "overage_limit": entitlement.overage_limit,
            },
        )
        balance = session.execute(query).scalar_one_or_none()
    if balance is None:
        raise UnknownBalance(f"no balance for customer {customer_id!r} in {entitlement_id!r}")
    return balance


# --- posting -------------------------------------------------------------------------------------


def find_entry(session: Session, dedupe_key: str) -> LedgerEntry | None:
    return session.execute(select(LedgerEntry).where(LedgerEntry.dedupe_key == dedupe_key)).scalar_one_or_none()


def grant(
    session: Session,
    balance: Balance,
    amount: int,
    *,
    source_key: str,
    starts_at: datetime,
    expires_at: datetime | None,
    source: Source = Source(),
    kind: str = "grant",
) -> LedgerEntry:
    """Add credits once per `source_key`; a repeat returns the first grant's entry."""
    if amount < 0:
        raise LedgerError("a grant cannot be negative")
    existing = find_entry(session, f"grant:{source_key}")
    if existing is not None:
        return existing
    new_grant = Grant(
        balance_id=balance.id,
        source_key=source_key,
        amount=amount,
        remaining=amount,
        starts_at=starts_at,
        expires_at=expires_at,
    )
    session.add(new_grant)
    session.flush()
    return post_one(
        session,
        balance,
        Posting(
            balance.id,
            kind,
            (balance.balance + amount, balance.overage),
            utcnow(),
            replace(source, dedupe_key=f"grant:{source_key}"),
            grant_id=new_grant.id,
        ),
    )


def _expire_grant(session: Session, balance: Balance, expiring: Grant, now: datetime) -> LedgerEntry | None:
    """Close one grant past its expiry; what was left of it leaves the balance as an `expiry` entry."""
    expiring.expired_at = now
    if not expiring.remaining:
        return None
    entry = post_one(
        session,
        balance,
        Posting(
            balance.id,
            "expiry",
            (balance.balance - expiring.remaining, balance.overage),
            utcnow(),
            Source(dedupe_key=f"expiry:{expiring.id}"),
            grant_id=expiring.id,
        ),
    )
    expiring.remaining = 0
    return entry


def expire_due_grants(session: Session, balance: Balance, now: datetime) -> list[LedgerEntry]:
    """Expire what is left of every grant past its expiry: one `expiry` entry per grant."""
    due = (
        session.execute(
            select(Grant)
            .where(Grant.balance_id == balance.id, Grant.expired_at.is_(None), Grant.expires_at <= now)
            .order_by(Grant.starts_at, Grant.id)
        )
        .scalars()
        .all()
    )
    return [entry for expiring in due if (entry := _expire_grant(session, balance, expiring, now)) is not None]


def reset_overage(
    session: Session, balance: Balance, *, dedupe_key: str, source: Source = Source()
) -> LedgerEntry | None:
    """Clear the accrued overage at a period's end (the provider bills it separately)."""
    if balance.overage == 0 or find_entry(session, dedupe_key) is not None:
        return None
    return post_one(
        session,
        balance,
        Posting(balance.id, "overage_reset", (balance.balance, 0), utcnow(), replace(source, dedupe_key=dedupe_key)),
    )


def deduct(
    session: Session,
    balance: Balance,
    amount: int,
    *,
    source: Source,
    now: datetime | None = None,
    kind: str = "deduction",
    known_new: bool = False,
) -> LedgerEntry:
    """Take `amount` atoms: balance first (oldest grant first), then overage. All or nothing.

    `known_new` skips the look-up of an earlier entry with the same dedupe key, for callers that hold a
    lock proving the cause is new (the usage workers); the unique key still refuses a duplicate.
    """
    if amount <= 0:
        raise LedgerError("a deduction must be above zero")
    if source.dedupe_key and not known_new:
        existing = find_entry(session, source.dedupe_key)
        if existing is not None:
            return existing
    now = now or utcnow()
    # One read serves both steps: grants past their expiry are closed first, the rest are consumed.
    candidates = (
        session.execute(
            select(Grant)
            .where(
                Grant.balance_id == balance.id,
                Grant.expired_at.is_(None),
                or_(Grant.remaining > 0, Grant.expires_at <= now),
            )
            .order_by(Grant.starts_at, Grant.id)
        )
        .scalars()
        .all()
    )
    live = []
    for candidate in candidates:
        if candidate.expires_at is not None and candidate.expires_at <= now:
            _expire_grant(session, balance, candidate, now)
        else:
            live.append(candidate)
    refusal = deduction_refusal(balance, amount)
    if refusal is not None:
        error = LimitExceeded if refusal.code == "limit_exceeded" else InsufficientCredits
        raise error(refusal.message)

    from_balance = min(amount, balance.balance)
    remaining = from_balance
    for grant_ in live:
        if remaining == 0:
            break
        taken = min(grant_.remaining, remaining)
        grant_.remaining -= taken
        remaining -= taken
    balance.period_used += amount
    return post_one(
        session,
        balance,
        Posting(
            balance.id, kind, (balance.balance - from_balance, balance.overage + (amount - from_balance)), now, source
        ),
    )


# --- billing periods -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodTerms:
    """What a plan gives for one billing period, in atoms."""

    subscription_id: str
    plan_key: str
    start: datetime
    end: datetime | None
    included: int
    hard_cap: int | None
    overage_enabled: bool
    overage_limit: int | None


def start_period(session: Session, balance: Balance, terms: PeriodTerms, *, source: Source = Source()) -> bool:
    """Move a (locked) balance into a new billing period, granting its credits once.

    The previous period's unused grant expires and its overage resets, each as an entry. A period
    that is not newer than the current one changes nothing, so late or repeated events are harmless.
    """
    if balance.period_start is not None and terms.start <= balance.period_start:
        return False
    if balance.period_start is not None:
        expire_due_grants(session, balance, terms.start)
        reset_overage(
            session, balance, source=source, dedupe_key=f"overage_reset:{balance.id}:{balance.period_start.isoformat()}"
        )
    balance.subscription_id, balance.plan_key = terms.subscription_id, terms.plan_key
    balance.period_start, balance.period_end = terms.start, terms.end
    balance.period_included, balance.period_used = terms.included, 0
    balance.hard_cap = terms.hard_cap
    balance.overage_enabled, balance.overage_limit = terms.overage_enabled, terms.overage_limit
    grant(
        session,
        balance,
        terms.included,
        starts_at=terms.start,
        expires_at=terms.end,
        source=source,
        source_key=f"period:{terms.subscription_id}:{terms.start.isoformat()}",
    )
    return True


def expire_all_due(session: Session, now: datetime | None = None) -> int:
    """The clock's sweep: expire grants and reset overage of periods that have ended."""
    now = now or utcnow()
    balance_keys = session.execute(
        select(Balance.customer_id, Balance.entitlement_id)
        .join(Grant, Grant.balance_id == Balance.id)
        .where(Grant.expired_at.is_(None), Grant.expires_at <= now)
        .distinct()
        # One global lock order (as the usage workers use), so concurrent lockers never deadlock.
        .order_by(Balance.customer_id, Balance.entitlement_id)
    ).all()
    count = 0
    for customer_id, entitlement_id in balance_keys:
        balance = lock_balance(session, customer_id, entitlement_id, create=False)
        count += len(expire_due_grants(session, balance, now))
        if balance.period_end is not None and balance.period_end <= now and balance.period_start is not None:
            reset_overage(session, balance, dedupe_key=f"overage_reset:{balance.id}:{balance.period_start.isoformat()}")
    return count
