"""Ledger operations on Tally-kept balances, under the balance's row lock; they write through `posting`.

Rules, after TigerBeetle's transfers:
- a cause (a grant's source, a usage event, an API idempotency key, a provider ledger entry) is a
  unique `dedupe_key`, so applying the same cause twice is a no-op that returns the first entry;
- a deduction takes from the balance first, oldest grant first, then accrues overage if enabled; one
  that would pass a limit is refused whole and writes nothing;
- `amount` is the change of the net position (balance - overage), so sums and chains can be audited.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy import insert, or_, select
from sqlalchemy.orm import Session

from app.catalogue import EntitlementSpec
from app.db import insert_ignoring_conflicts, table_of, utcnow
from app.ledger.amounts import to_atoms
from app.ledger.errors import InsufficientCredits, LedgerError, LimitExceeded, ProviderManaged, UnknownBalance
from app.ledger.limits import LimitedBalance, deduction_refusal
from app.ledger.posting import PlannedEntry, Position, Posting, Source, Writes, among, append, post_one
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


def _refuse_past_limits(balance: LimitedBalance, amount: int) -> None:
    refusal = deduction_refusal(balance, amount)
    if refusal is not None:
        error = LimitExceeded if refusal.code == "limit_exceeded" else InsufficientCredits
        raise error(refusal.message)


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
    _refuse_past_limits(balance, amount)

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


# --- set-based: many operations on balances locked once, computed in memory, written once ---------


@dataclass
class LiveGrant:
    """A grant as a batch holds it; `loaded` is its (remaining, expired_at) as read: only changed ones are written."""

    id: int
    starts_at: datetime
    expires_at: datetime | None
    remaining: int
    expired_at: datetime | None = None
    loaded: tuple[int, datetime | None] = (0, None)

    @property
    def order(self) -> tuple[datetime, int]:
        """Oldest first: the order deductions consume and expiries close grants in."""
        return (self.starts_at, self.id)


@dataclass
class Account:
    """A locked balance as a batch holds it: what the limit rules read (`LimitedBalance`), moved by postings."""

    id: int
    customer_id: str
    entitlement_id: str
    balance: int
    overage: int
    overage_enabled: bool
    overage_limit: int | None
    period_used: int
    hard_cap: int | None
    subscription_id: str | None
    period_start: datetime | None
    period_end: datetime | None
    loaded: Position
    """The position as read: where `posting.plan` starts."""
    grants: list[LiveGrant] = field(default_factory=list)
    """Unexpired when read (or granted in the batch), oldest first."""

    def copy(self) -> Account:
        return replace(self, grants=[replace(live) for live in self.grants])


@dataclass(frozen=True)
class Checkpoint:
    postings: int
    accounts: dict[int, Account]
    grants_made: int


class LedgerBatch:
    """Deductions, grants and expiries on balances locked once, computed in memory and written in one go.

    The rules are `deduct`'s, `grant`'s and `expire_due_grants`' entry for entry (tests/test_ledger_batch.py
    holds the batch to them): expiry closes grants past their `now` first, a deduction takes the balance
    (oldest grant first) then overage or is refused whole, and an expiry done before a refused deduction
    stays, as it does when `deduct` raises. Every movement is a `Posting`; `write` plans them all through
    `posting.plan` and issues one statement per table.
    """

    def __init__(self, accounts: Iterable[Account]) -> None:
        self.accounts = {account.id: account for account in accounts}
        self._by_key = {(account.customer_id, account.entitlement_id): account.id for account in self.accounts.values()}
        self.postings: list[Posting] = []
        self._granted: set[str] = set()
        self._grants_made = 0

    @classmethod
    def lock(cls, session: Session, keys: Iterable[tuple[str, str]]) -> LedgerBatch:
        """Lock the existing balances among `keys` (customer, entitlement) and load their live grants: two statements.

        One `SELECT … ORDER BY customer_id, entitlement_id FOR UPDATE` takes the row locks in the one global
        order every locker uses (PostgreSQL locks the rows as the sorted scan returns them), so batches, the
        write API and the clock never wait on each other in a cycle.
        """
        wanted = sorted(set(keys))
        if not wanted:
            return cls([])
        balances = table_of(Balance)
        rows = session.execute(
            select(balances)
            .where(among(session, [balances.c.customer_id, balances.c.entitlement_id], wanted))
            .order_by(balances.c.customer_id, balances.c.entitlement_id)
            .with_for_update()
        ).all()
        accounts = {
            row.id: Account(
                id=row.id,
                customer_id=row.customer_id,
                entitlement_id=row.entitlement_id,
                balance=row.balance,
                overage=row.overage,
                overage_enabled=row.overage_enabled,
                overage_limit=row.overage_limit,
                period_used=row.period_used,
                hard_cap=row.hard_cap,
                subscription_id=row.subscription_id,
                period_start=row.period_start,
                period_end=row.period_end,
                loaded=Position((row.balance, row.overage), row.entry_count, row.last_transaction_at),
            )
            for row in rows
        }
        if accounts:
            grants = table_of(Grant)
            live = session.execute(
                select(grants.c.id, grants.c.balance_id, grants.c.starts_at, grants.c.expires_at, grants.c.remaining)
                .where(
                    among(session, [grants.c.balance_id], [(balance_id,) for balance_id in accounts]),
                    grants.c.expired_at.is_(None),
                    # an exhausted grant matters only while it can still expire (it is closed then)
                    or_(grants.c.remaining > 0, grants.c.expires_at.is_not(None)),
                )
                .order_by(grants.c.balance_id, grants.c.starts_at, grants.c.id)
            )
            for grant_id, balance_id, starts_at, expires_at, remaining in live:
                accounts[balance_id].grants.append(
                    LiveGrant(grant_id, starts_at, expires_at, remaining, loaded=(remaining, None))
                )
        return cls(accounts.values())

    def account(self, customer_id: str, entitlement_id: str) -> Account | None:
        balance_id = self._by_key.get((customer_id, entitlement_id))
        return None if balance_id is None else self.accounts[balance_id]

    def _post(self, account: Account, posting: Posting) -> None:
        self.postings.append(posting)
        account.balance, account.overage = posting.after

    def _expire(self, account: Account, live: LiveGrant, now: datetime) -> None:
        live.expired_at = now
        if live.remaining:
            after = (account.balance - live.remaining, account.overage)
            source = Source(dedupe_key=f"expiry:{live.id}")
            self._post(account, Posting(account.id, "expiry", after, utcnow(), source, grant_id=live.id))
            live.remaining = 0

    def expire_due(self, balance_id: int, now: datetime) -> None:
        """`expire_due_grants`: close every grant past its expiry, an `expiry` entry for what was left of each."""
        account = self.accounts[balance_id]
        for live in account.grants:
            if live.expired_at is None and live.expires_at is not None and live.expires_at <= now:
                self._expire(account, live, now)

    def deduct(self, balance_id: int, amount: int, *, source: Source, now: datetime, kind: str = "deduction") -> None:
        """`deduct` for a cause known to be new: expiry first, then the limits (raising a `LedgerRefusal`), then
        the balance oldest grant first and overage for the rest."""
        if amount <= 0:
            raise LedgerError("a deduction must be above zero")
        account = self.accounts[balance_id]
        self.expire_due(balance_id, now)
        _refuse_past_limits(account, amount)
        from_balance = min(amount, account.balance)
        remaining = from_balance
        for live in account.grants:
            if remaining == 0:
                break
            if live.expired_at is None:
                taken = min(live.remaining, remaining)
                live.remaining -= taken
                remaining -= taken
        account.period_used += amount
        after = (account.balance - from_balance, account.overage + (amount - from_balance))
        self._post(account, Posting(account.id, kind, after, now, source))

    def grant(
        self,
        session: Session,
        balance_id: int,
        amount: int,
        *,
        source_key: str,
        starts_at: datetime,
        expires_at: datetime | None,
        source: Source = Source(),
        kind: str = "grant",
    ) -> bool:
        """`grant`: credits once per `source_key` (False for a repeat). The grant row goes in at once, for its id."""
        if amount < 0:
            raise LedgerError("a grant cannot be negative")
        dedupe_key = f"grant:{source_key}"
        if dedupe_key in self._granted or find_entry(session, dedupe_key) is not None:
            return False
        account = self.accounts[balance_id]
        grants = table_of(Grant)
        values = {
            "balance_id": balance_id,
            "source_key": source_key,
            "amount": amount,
            "remaining": amount,
            "starts_at": starts_at,
            "expires_at": expires_at,
            "created_at": utcnow(),
        }
        grant_id: int = session.execute(insert(grants).values(values).returning(grants.c.id)).scalar_one()
        live = LiveGrant(grant_id, starts_at, expires_at, amount, loaded=(amount, None))
        bisect.insort(account.grants, live, key=lambda item: item.order)
        self._granted.add(dedupe_key)
        self._grants_made += 1
        after = (account.balance + amount, account.overage)
        self._post(
            account,
            Posting(balance_id, kind, after, utcnow(), replace(source, dedupe_key=dedupe_key), grant_id=grant_id),
        )
        return True

    def checkpoint(self, balance_ids: Iterable[int]) -> Checkpoint:
        """What `rollback` returns to: for operations on `balance_ids` that must happen whole or not at all."""
        return Checkpoint(len(self.postings), {i: self.accounts[i].copy() for i in balance_ids}, self._grants_made)

    def rollback(self, checkpoint: Checkpoint) -> None:
        """Forget what happened since `checkpoint` (once per checkpoint; not past a grant: its row is written)."""
        dropped = self.postings[checkpoint.postings :]
        if self._grants_made != checkpoint.grants_made or not {p.balance_id for p in dropped} <= set(
            checkpoint.accounts
        ):
            raise LedgerError("rollback past a grant, or of a balance the checkpoint does not hold")
        del self.postings[checkpoint.postings :]
        self.accounts.update(checkpoint.accounts)

    def write(self, writes: Writes) -> list[PlannedEntry]:
        """Every entry (one INSERT), every moved balance (one UPDATE) and every changed grant (one UPDATE), added
        to `writes` for the caller to send with its own."""
        touched = sorted({posting.balance_id for posting in self.postings})
        planned, moved = append(
            writes,
            {balance_id: self.accounts[balance_id].loaded for balance_id in touched},
            self.postings,
            balance_columns={
                balance_id: {"period_used": self.accounts[balance_id].period_used} for balance_id in touched
            },
        )
        for balance_id, position in moved.items():
            account = self.accounts[balance_id]
            if position.state != (account.balance, account.overage):  # the plan and the batch disagree: never write
                raise LedgerError(
                    f"balance {balance_id}: planned {position.state}, held {(account.balance, account.overage)}"
                )
        changed = [
            {"id": live.id, "remaining": live.remaining, "expired_at": live.expired_at}
            for account in self.accounts.values()
            for live in account.grants
            if (live.remaining, live.expired_at) != live.loaded
        ]
        writes.update(table_of(Grant), changed)
        return planned


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
