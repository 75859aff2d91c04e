"""Mirroring a provider's own credit ledger (Dodo Payments) into Tally's ledger, in any arrival order.

A provider that keeps the ledger itself (Dodo) sends each of its entries with the balance and overage
before and after it. Tally stores each entry once (unique on the provider's entry id) and never
derives the balance from arrival order:

- the entries of a balance are ordered as the provider ordered them: by `created_at`, and within one
  instant by chain linkage (an order in which every entry starts where the previous one ended,
  searched with candidates in entry-id order; when no such order exists, the entry whose before
  matches the running state, else a chain head, else the lowest id), so the order depends only on
  the *set* of entries, never on their arrival;
- the balance's current balance/overage are the after-values of the last entry in that order;
- an entry whose before-values differ from the previous entry's after-values (or from zero for the
  first) follows a *gap*: an entry Tally has not received yet. The gap is recorded on the entry
  (`ProviderLedgerEntry.follows_gap` with the expected values) for reconciliation to fill; nothing
  is guessed. A late entry that closes the gap clears it when the chain is recomputed.

`LedgerEntry.amount` keeps its meaning (the change of balance - overage), computed from the entry's
own before/after. So for a mirrored balance: `balance - overage == sum(amount) + sum(gap jumps)`,
where a gap jump is what the missing entries moved. `verify_mirrored` checks exactly that and reports
recorded gaps as known (not as corruption); an unrecorded or stale gap, a wrong amount, or a balance
that is not its last entry's after-values are breaches.

Reconciliation adjustments (`adjust_mirrored`) are the one kind of Tally entry a mirrored balance may
hold: when the provider's balance differs and no entry of its ledger explains it, the provider is
authoritative, and one `reconciliation_adjustment` entry moves the mirror from where its chain ends
to the provider's values. It takes part in the chain like a provider entry (ordered by its time,
linked by its before/after), so the provider's next entry follows it without a gap.

This module takes plain values (ids, atoms, datetimes); provider payload formats stay in
`app.providers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.db import insert_ignoring_conflicts, utcnow
from app.ledger.errors import LedgerError, ProviderManaged
from app.ledger.posting import Position, Posting, Source, State, net, post_one, reposition
from app.ledger.service import find_entry, lock_balance
from app.models import Balance, CreditEntitlement, LedgerEntry, ProviderEntitlement, ProviderLedgerEntry

ADJUSTMENT = "reconciliation_adjustment"
"""The kind of a reconciliation adjustment entry: the only non-provider entry a mirrored balance accepts."""

MIRROR_PRECISION = 10
"""Atoms of mirrored amounts: the provider's payloads do not say the entitlement's precision (0–10)."""

ZERO: State = (0, 0)


@dataclass(frozen=True)
class ProviderEntry:
    """One entry of a provider's ledger, in plain values (amounts in atoms at MIRROR_PRECISION)."""

    provider: str
    external_id: str
    customer_id: str
    entitlement_id: str
    kind: str  # Tally's kind: grant, deduction, expiry, rollover, overage_charge, …
    transaction_type: str  # the provider's own name for it
    is_credit: bool
    amount: int  # the provider's positive amount
    balance_before: int
    balance_after: int
    overage_before: int
    overage_after: int
    created_at: datetime
    description: str | None = None
    provider_grant_id: str | None = None
    reference_type: str | None = None
    reference_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    display_precision: int = 0  # decimal places the provider used for this entry's amounts

    @property
    def dedupe_key(self) -> str:
        return f"{self.provider}:{self.external_id}"


# --- the chain, as a pure function of the set of entries ------------------------------------------


@dataclass(frozen=True)
class Link:
    """What ordering needs of an entry."""

    key: str  # the provider's entry id: the deterministic tie-breaker
    created_at: datetime
    before: State
    after: State


@dataclass(frozen=True)
class Placed:
    link: Link
    position: int
    expected_before: State | None  # set when the entry follows a gap


def _unbroken_order(links: list[Link], state: State, budget: int = 10_000) -> list[Link] | None:
    """An order of one instant's entries (sorted by key) in which every link holds, or None.

    A depth-first search, candidates in key order, so the answer is deterministic; entries sharing
    one instant are few (a deduction split into balance and overage), and the budget bounds the rest.
    """
    used = [False] * len(links)
    path: list[Link] = []
    steps = 0

    def extend(current: State) -> bool:
        nonlocal steps
        if len(path) == len(links):
            return True
        steps += 1
        if steps > budget:
            return False
        tried: set[tuple[State, State]] = set()
        for index, link in enumerate(links):
            if used[index] or link.before != current or (link.before, link.after) in tried:
                continue
            tried.add((link.before, link.after))
            used[index] = True
            path.append(link)
            if extend(link.after):
                return True
            used[index] = False
            path.pop()
        return False

    return path if extend(state) else None


def order_chain(links: Sequence[Link], start: State = ZERO) -> list[Placed]:
    """Order entries as the provider did and find the gaps; the result depends only on the set."""
    by_time: dict[datetime, list[Link]] = {}
    for link in links:
        by_time.setdefault(link.created_at, []).append(link)
    placed: list[Placed] = []
    state = start
    for moment in sorted(by_time):
        remaining = sorted(by_time[moment], key=lambda link: link.key)
        unbroken = _unbroken_order(remaining, state) if len(remaining) > 1 else None
        if unbroken is not None:
            for link in unbroken:
                placed.append(Placed(link, len(placed), None))
            state = unbroken[-1].after
            continue
        while remaining:
            chosen = next((link for link in remaining if link.before == state), None)
            if chosen is None:
                # A broken link: prefer an entry that no other entry of this instant leads into.
                afters = {link.after for link in remaining}
                chosen = next((link for link in remaining if link.before not in afters), remaining[0])
            remaining.remove(chosen)
            placed.append(Placed(chosen, len(placed), None if chosen.before == state else state))
            state = chosen.after
    return placed


# --- writing -------------------------------------------------------------------------------------


def ensure_provider_entitlement(session: Session, entitlement_id: str, provider: str) -> CreditEntitlement:
    """The entitlement row of a provider-owned entitlement, created with placeholders if unseen.

    A credit event can arrive before the subscription that names the entitlement; its name and unit
    are filled in when the subscription snapshot arrives.
    """
    insert_ignoring_conflicts(
        session,
        CreditEntitlement,
        {
            "id": entitlement_id,
            "managed_by": provider,
            "name": entitlement_id,
            "unit": "credits",
            "precision": MIRROR_PRECISION,
            "overage_enabled": True,
            "overage_limit": None,
            "created_at": utcnow(),
            "updated_at": utcnow(),
        },
    )
    insert_ignoring_conflicts(
        session,
        ProviderEntitlement,
        {
            "entitlement_id": entitlement_id,
            "provider": provider,
            "display_precision": 0,
            "updated_at": utcnow(),
        },
    )
    entitlement = session.get(CreditEntitlement, entitlement_id)
    assert entitlement is not None
    if entitlement.managed_by != provider:
        raise ProviderManaged(f"entitlement {entitlement_id!r} is managed by {entitlement.managed_by}, not {provider}")
    if entitlement.precision != MIRROR_PRECISION:
        raise LedgerError(
            f"entitlement {entitlement_id!r} has precision {entitlement.precision}, mirrors store {MIRROR_PRECISION}"
        )
    return entitlement


def note_display_precision(session: Session, entitlement_id: str, places: int) -> None:
    """Remember the most decimal places the provider used, so responses render as it does.

    Only ever grows, so the outcome does not depend on the order events arrive in; one conditional
    UPDATE, so concurrent writers cannot lose the larger value.
    """
    places = min(places, MIRROR_PRECISION)
    session.execute(
        update(ProviderEntitlement)
        .where(ProviderEntitlement.entitlement_id == entitlement_id, ProviderEntitlement.display_precision < places)
        .values(display_precision=places, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def mirror_entry(session: Session, entry: ProviderEntry, *, inbox_event_id: int | None = None) -> LedgerEntry:
    """Store a provider ledger entry once and move the balance to the newest entry's after-values.

    The caller has made sure the customer exists. A repeat of the same provider entry returns the
    stored one and changes nothing.
    """
    values = (entry.balance_before, entry.balance_after, entry.overage_before, entry.overage_after)
    if min(values) < 0:
        raise LedgerError(f"entry {entry.external_id}: balances and overage cannot be negative")
    ensure_provider_entitlement(session, entry.entitlement_id, entry.provider)
    balance = lock_balance(session, entry.customer_id, entry.entitlement_id)
    existing = find_entry(session, entry.dedupe_key)
    if existing is not None:
        return existing
    before: State = (entry.balance_before, entry.overage_before)
    after: State = (entry.balance_after, entry.overage_after)
    newest = balance.last_transaction_at is None or entry.created_at > balance.last_transaction_at
    current: State = (balance.balance, balance.overage)
    ledger_entry = post_one(
        session,
        balance,
        Posting(
            balance.id,
            entry.kind,
            after,
            entry.created_at,
            Source(
                dedupe_key=entry.dedupe_key,
                inbox_event_id=inbox_event_id,
                external_id=entry.external_id,
                description=entry.description,
            ),
            before=before,
            moves_balance=newest,
        ),
    )
    provider_row = ProviderLedgerEntry(
        ledger_entry_id=ledger_entry.id,
        balance_id=balance.id,
        provider=entry.provider,
        external_id=entry.external_id,
        transaction_type=entry.transaction_type,
        is_credit=entry.is_credit,
        amount=entry.amount,
        provider_grant_id=entry.provider_grant_id,
        reference_type=entry.reference_type,
        reference_id=entry.reference_id,
        extra=entry.extra or None,
    )
    session.add(provider_row)
    if newest:
        # The common case: the newest entry so far goes at the end and the chain before it stands.
        provider_row.chain_position = balance.entry_count - 1
        _mark_gap(provider_row, None if before == current else current)
        session.flush()
    else:
        session.flush()
        rechain(session, balance)
    note_display_precision(session, entry.entitlement_id, entry.display_precision)
    return ledger_entry


def _mark_gap(row: ProviderLedgerEntry, expected: State | None) -> None:
    row.follows_gap = expected is not None
    row.expected_balance_before = expected[0] if expected else None
    row.expected_overage_before = expected[1] if expected else None


def _mirrored_links(session: Session, balance_id: int) -> list[tuple[Link, ProviderLedgerEntry | None]]:
    """The balance's chain: its provider entries (with their rows) and its adjustments (row None)."""
    rows = session.execute(
        select(LedgerEntry, ProviderLedgerEntry)
        .outerjoin(ProviderLedgerEntry, ProviderLedgerEntry.ledger_entry_id == LedgerEntry.id)
        .where(
            LedgerEntry.balance_id == balance_id,
            or_(ProviderLedgerEntry.ledger_entry_id.is_not(None), LedgerEntry.kind == ADJUSTMENT),
        )
    ).all()
    return [
        (
            Link(
                provider.external_id if provider is not None else (entry.dedupe_key or f"adjustment:{entry.id}"),
                entry.created_at,
                (entry.balance_before, entry.overage_before),
                (entry.balance_after, entry.overage_after),
            ),
            provider,
        )
        for entry, provider in rows
    ]


def adjust_mirrored(
    session: Session, balance: Balance, after: State, at: datetime, *, dedupe_key: str, description: str
) -> LedgerEntry:
    """Move a (locked) mirrored balance to the provider's values with one `reconciliation_adjustment`.

    It goes at the end of the chain: at `at` (the provider's time for the balance), or just after the
    newest entry if that is later, so the order stays the provider's.
    """
    existing = find_entry(session, dedupe_key)
    if existing is not None:
        return existing
    if min(after) < 0:
        raise LedgerError("a mirrored balance cannot go negative")
    last = balance.last_transaction_at
    if last is not None and at <= last:
        at = last + timedelta(microseconds=1)
    return post_one(
        session,
        balance,
        Posting(
            balance.id,
            ADJUSTMENT,
            after,
            at,
            Source(dedupe_key=dedupe_key, description=description),
            before=(balance.balance, balance.overage),
        ),
    )


def rechain(session: Session, balance: Balance) -> None:
    """Recompute positions and gaps of a (locked) balance's entries, and its state from the last one."""
    pairs = _mirrored_links(session, balance.id)
    rows = {link.key: row for link, row in pairs}
    placed = order_chain([link for link, _ in pairs])
    for item in placed:
        row = rows[item.link.key]
        if row is None:
            continue  # an adjustment: it starts where the chain stood when it was made
        row.chain_position = item.position
        _mark_gap(row, item.expected_before)
    if placed:
        last = placed[-1].link
        reposition(balance, Position(last.after, balance.entry_count, last.created_at))
    session.flush()


# --- auditing ------------------------------------------------------------------------------------


@dataclass
class MirrorAudit:
    problems: list[str] = field(default_factory=list)  # breaches: `tally verify` fails
    known_gaps: list[str] = field(default_factory=list)  # recorded, awaiting reconciliation


def verify_mirrored(session: Session, balance: Balance, label: str) -> MirrorAudit:
    """Check a mirrored balance against its entries in the provider's order (see the module doc)."""
    audit = MirrorAudit()
    entries = session.execute(select(LedgerEntry).where(LedgerEntry.balance_id == balance.id)).scalars().all()
    pairs = _mirrored_links(session, balance.id)
    unmirrored = len(entries) - len(pairs)
    if unmirrored:
        audit.problems.append(
            f"{label}: {unmirrored} entries of a provider-managed balance are neither provider entries "
            "nor reconciliation adjustments"
        )
    for entry in entries:
        expected = (entry.balance_after - entry.overage_after) - (entry.balance_before - entry.overage_before)
        if entry.amount != expected:
            audit.problems.append(f"{label}: entry {entry.id} amount {entry.amount} does not match its before/after")
    rows = {link.key: row for link, row in pairs}
    placed = order_chain([link for link, _ in pairs])
    jumps = 0
    for item in placed:
        row = rows[item.link.key]
        if row is None:
            # A reconciliation adjustment: accounted for in the sums, and linked like a provider entry.
            if item.expected_before is not None:
                jumps += item.link.before[0] - item.link.before[1] - net(item.expected_before)
                audit.known_gaps.append(
                    f"{label}: an entry older than reconciliation adjustment {item.link.key} arrived after it: "
                    f"expected {item.expected_before}, the adjustment starts at {item.link.before} "
                    "(left for the next reconciliation)"
                )
            continue
        recorded = (row.expected_balance_before, row.expected_overage_before) if row.follows_gap else None
        if item.expected_before is not None:
            jumps += item.link.before[0] - item.link.before[1] - net(item.expected_before)
            if recorded != item.expected_before:
                audit.problems.append(
                    f"{label}: an unrecorded gap before provider entry {row.external_id}: "
                    f"expected {item.expected_before}, it starts at {item.link.before}"
                )
            else:
                audit.known_gaps.append(
                    f"{label}: known gap before provider entry {row.external_id}: expected "
                    f"{item.expected_before}, it starts at {item.link.before} "
                    "(missing entries, left for reconciliation)"
                )
        elif recorded is not None:
            audit.problems.append(
                f"{label}: provider entry {row.external_id} is marked as following a gap that is no longer there"
            )
        if row.chain_position != item.position:
            audit.problems.append(
                f"{label}: provider entry {row.external_id} is at position {row.chain_position}, "
                f"the provider's order puts it at {item.position}"
            )
    state = placed[-1].link.after if placed else ZERO
    if state != (balance.balance, balance.overage):
        audit.problems.append(
            f"{label}: the newest provider entry ends at {state}, the balance is {(balance.balance, balance.overage)}"
        )
    total = sum(entry.amount for entry in entries)
    if balance.balance - balance.overage != total + jumps:
        audit.problems.append(
            f"{label}: balance - overage = {balance.balance - balance.overage} but its entries "
            f"sum to {total} and its recorded gaps to {jumps}"
        )
    if balance.balance < 0 or balance.overage < 0:
        audit.problems.append(f"{label}: negative balance or overage ({balance.balance}, {balance.overage})")
    if len(entries) != balance.entry_count:
        audit.problems.append(f"{label}: {len(entries)} entries but the balance counts {balance.entry_count}")
    return audit


def mirrored_balance_ids(session: Session) -> set[int]:
    """Balances whose entitlement a provider owns: their chains follow the provider's order."""
    return set(
        session.execute(
            select(Balance.id)
            .join(CreditEntitlement, CreditEntitlement.id == Balance.entitlement_id)
            .where(CreditEntitlement.managed_by != "tally")
        ).scalars()
    )


def audit_mirrored(session: Session) -> MirrorAudit:
    """`verify_mirrored` over every provider-managed balance."""
    total = MirrorAudit()
    ids = mirrored_balance_ids(session)
    for balance in session.execute(select(Balance).where(Balance.id.in_(ids)).order_by(Balance.id)).scalars():
        audit = verify_mirrored(
            session, balance, f"balance {balance.id} ({balance.customer_id}/{balance.entitlement_id})"
        )
        total.problems.extend(audit.problems)
        total.known_gaps.extend(audit.known_gaps)
    return total
