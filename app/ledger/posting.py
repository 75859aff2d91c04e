"""The one way the ledger is written: postings become entries, and balances move with them.

Every `ledger_entries` row and every move of a balance's position (balance, overage, entry count,
last transaction) is made here: native grants, deductions, expiry and overage resets, the mirror of
a provider's ledger, and reconciliation adjustments. `post` takes a batch; a single posting is a
batch of one.

The arithmetic is a pure function, `plan`, from the balances' positions and the postings to the
entries and the new positions, so it can be checked on its own and against a one-at-a-time
reference. `amount` is always the change of the net position (balance - overage), so for every
balance `balance - overage == sum(amount)` (plus, for a mirror, the jumps of its recorded gaps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy.orm import Session

from app.models import Balance, LedgerEntry

State = tuple[int, int]  # (balance, overage) in atoms


def net(state: State) -> int:
    return state[0] - state[1]


@dataclass(frozen=True)
class Source:
    """Why an entry exists; `dedupe_key` makes the cause count once."""

    dedupe_key: str | None = None
    inbox_event_id: int | None = None
    usage_event_id: str | None = None
    idempotency_key: str | None = None
    external_id: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class Posting:
    """One movement asked of a balance.

    `before` is None for a balance Tally keeps: the entry starts where the balance stands. A mirrored
    provider entry carries the provider's own before-values, and `moves_balance` is False when it
    arrived late: the entry is recorded and the balance's position is re-derived from the chain.
    """

    balance_id: int
    kind: str
    after: State
    at: datetime
    source: Source = Source()
    before: State | None = None
    moves_balance: bool = True
    grant_id: int | None = None


@dataclass(frozen=True)
class Position:
    """What posting changes on a balance."""

    state: State
    entry_count: int
    last_transaction_at: datetime | None


@dataclass(frozen=True)
class PlannedEntry:
    balance_id: int
    kind: str
    amount: int
    before: State
    after: State
    at: datetime
    source: Source
    grant_id: int | None


def plan(
    positions: Mapping[int, Position], postings: Sequence[Posting]
) -> tuple[list[PlannedEntry], dict[int, Position]]:
    """The entries of `postings`, in order, and every touched balance's position after them. Pure."""
    current = dict(positions)
    entries: list[PlannedEntry] = []
    for posting in postings:
        position = current[posting.balance_id]
        before = position.state if posting.before is None else posting.before
        entries.append(
            PlannedEntry(
                balance_id=posting.balance_id,
                kind=posting.kind,
                amount=net(posting.after) - net(before),
                before=before,
                after=posting.after,
                at=posting.at,
                source=posting.source,
                grant_id=posting.grant_id,
            )
        )
        if posting.moves_balance:
            position = Position(posting.after, position.entry_count, posting.at)
        current[posting.balance_id] = replace(position, entry_count=position.entry_count + 1)
    return entries, {balance_id: current[balance_id] for balance_id in {p.balance_id for p in postings}}


def position_of(balance: Balance) -> Position:
    return Position((balance.balance, balance.overage), balance.entry_count, balance.last_transaction_at)


def reposition(balance: Balance, position: Position) -> None:
    """Set a (locked) balance's position: after posting, or when a mirror re-derives it from its chain."""
    balance.balance, balance.overage = position.state
    balance.entry_count = position.entry_count
    balance.last_transaction_at = position.last_transaction_at


def post(session: Session, balances: Mapping[int, Balance], postings: Sequence[Posting]) -> list[LedgerEntry]:
    """Append the entries of `postings` and move their (locked) balances; the entries, in order."""
    if not postings:
        return []
    planned, positions = plan(
        {balance_id: position_of(balances[balance_id]) for balance_id in {p.balance_id for p in postings}}, postings
    )
    entries = [
        LedgerEntry(
            balance_id=item.balance_id,
            kind=item.kind,
            amount=item.amount,
            balance_before=item.before[0],
            balance_after=item.after[0],
            overage_before=item.before[1],
            overage_after=item.after[1],
            grant_id=item.grant_id,
            dedupe_key=item.source.dedupe_key,
            inbox_event_id=item.source.inbox_event_id,
            usage_event_id=item.source.usage_event_id,
            idempotency_key=item.source.idempotency_key,
            external_id=item.source.external_id,
            description=item.source.description,
            created_at=item.at,
        )
        for item in planned
    ]
    session.add_all(entries)
    for balance_id, position in positions.items():
        reposition(balances[balance_id], position)
    session.flush()
    return entries


def post_one(session: Session, balance: Balance, posting: Posting) -> LedgerEntry:
    """A batch of one."""
    return post(session, {balance.id: balance}, [posting])[0]
