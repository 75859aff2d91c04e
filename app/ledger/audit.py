"""`tally verify`: the ledger's invariants, checked from the stored rows alone.

For a balance Tally keeps itself: `balance - overage` equals the sum of its entries' amounts, the
entries' before/after values chain unbroken in the order they were written and end at the balance,
each entry's amount matches its own before/after, the balance equals what its unexpired grants still
hold, and overage stays within its limit. Balances mirrored from a provider's ledger follow the
provider's order and may have recorded gaps: `app.ledger.mirror` audits those (known gaps are
notices, not breaches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.ledger.mirror import audit_mirrored, mirrored_balance_ids
from app.models import Balance, Grant, LedgerEntry


@dataclass
class Audit:
    problems: list[str] = field(default_factory=list)  # breaches: `tally verify` exits non-zero
    notices: list[str] = field(default_factory=list)  # known and recorded, e.g. gaps awaiting reconciliation


def _label(balance: Balance) -> str:
    return f"balance {balance.id} ({balance.customer_id}/{balance.entitlement_id})"


def _audit_native(session: Session, mirrored: set[int]) -> list[str]:
    problems: list[str] = []
    balances = {b.id: b for b in session.execute(select(Balance)).scalars() if b.id not in mirrored}
    held = dict(
        session.execute(
            select(Grant.balance_id, func.sum(Grant.remaining))
            .where(Grant.expired_at.is_(None))
            .group_by(Grant.balance_id)
        ).all()
    )
    # One pass over every entry in write order, streamed: memory stays flat however long the ledger.
    walk: dict[int, tuple[tuple[int, int], int, int]] = {}  # balance id -> (last after, sum, count)
    entries = session.execute(
        select(
            LedgerEntry.id,
            LedgerEntry.balance_id,
            LedgerEntry.amount,
            LedgerEntry.balance_before,
            LedgerEntry.overage_before,
            LedgerEntry.balance_after,
            LedgerEntry.overage_after,
        )
        .order_by(LedgerEntry.balance_id, LedgerEntry.id)
        .execution_options(yield_per=5000)
    )
    for entry_id, balance_id, amount, balance_before, overage_before, balance_after, overage_after in entries:
        balance = balances.get(balance_id)
        if balance is None:
            continue
        previous, total, count = walk.get(balance_id, ((0, 0), 0, 0))
        if (balance_before, overage_before) != previous:
            problems.append(
                f"{_label(balance)}: entry {entry_id} starts at {(balance_before, overage_before)} "
                f"but the previous entry ended at {previous}"
            )
        if (balance_after - overage_after) - (balance_before - overage_before) != amount:
            problems.append(f"{_label(balance)}: entry {entry_id} amount {amount} does not match its before/after")
        walk[balance_id] = ((balance_after, overage_after), total + amount, count + 1)

    for balance_id, balance in sorted(balances.items()):
        last, total, count = walk.get(balance_id, ((0, 0), 0, 0))
        label = _label(balance)
        net = balance.balance - balance.overage
        if net != total:
            problems.append(f"{label}: balance - overage = {net} but its entries sum to {total}")
        if last != (balance.balance, balance.overage):
            problems.append(f"{label}: last entry ends at {last}, balance is {(balance.balance, balance.overage)}")
        if count != balance.entry_count:
            problems.append(f"{label}: {count} entries but the balance counts {balance.entry_count}")
        if balance.balance < 0 or balance.overage < 0:
            problems.append(f"{label}: negative balance or overage ({balance.balance}, {balance.overage})")
        if balance.balance != (held.get(balance_id) or 0):
            problems.append(
                f"{label}: balance {balance.balance} but its unexpired grants hold {held.get(balance_id) or 0}"
            )
        if balance.overage_limit is not None and balance.overage > balance.overage_limit:
            problems.append(f"{label}: overage {balance.overage} is past its limit {balance.overage_limit}")
    return problems


def audit(session: Session) -> Audit:
    mirrored = mirrored_balance_ids(session)
    provider = audit_mirrored(session)
    return Audit(problems=_audit_native(session, mirrored) + provider.problems, notices=provider.known_gaps)


def verify(session: Session) -> list[str]:
    """Every breach of the ledger's invariants, as readable lines (empty when all hold)."""
    return audit(session).problems
