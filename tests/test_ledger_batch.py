"""The set-based ledger path: `posting.plan` as the pure function it is, and `LedgerBatch` against one at a time.

The batch (balances locked once, every operation computed in memory, one statement per table) must write
exactly what `grant`, `deduct` and `expire_due_grants` write when called one at a time, each in its own
transaction: the same entries (kind, amount, before/after, dedupe keys), balances, period usage and grants.
Hypothesis draws the operations; both sides start from identical balances of their own customers.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from app.billing.subscriptions import ensure_customer
from app.catalogue import EntitlementSpec
from app.db import Database
from app.ledger.audit import verify
from app.ledger.errors import LedgerRefusal
from app.ledger.posting import Position, Posting, Source, Writes, net, plan
from app.ledger.service import (
    LedgerBatch,
    PeriodTerms,
    deduct,
    expire_due_grants,
    grant,
    lock_balance,
    start_period,
    sync_entitlement,
)
from app.models import Balance, Grant, LedgerEntry

T0 = datetime(2026, 3, 1, tzinfo=UTC)
EXAMPLES = int(os.environ.get("TALLY_MODEL_EXAMPLES", "25"))

# --- plan: a pure function ---------------------------------------------------------------------------

states = st.tuples(st.integers(0, 10**6), st.integers(0, 10**6))


@st.composite
def positions_and_postings(draw: st.DrawFn) -> tuple[dict[int, Position], list[Posting]]:
    ids = draw(st.lists(st.integers(1, 50), min_size=1, max_size=4, unique=True))
    positions = {
        balance_id: Position(draw(states), draw(st.integers(0, 100)), draw(st.none() | st.just(T0)))
        for balance_id in ids
    }
    postings = [
        Posting(
            draw(st.sampled_from(ids)),
            draw(st.sampled_from(["grant", "deduction", "expiry", "overage_reset"])),
            draw(states),
            T0 + timedelta(seconds=n),
            Source(dedupe_key=f"k{n}"),
            before=draw(st.none() | states),
            moves_balance=draw(st.booleans()),
        )
        for n in range(draw(st.integers(0, 12)))
    ]
    return positions, postings


@given(positions_and_postings())
def test_plan_chains_every_entry_onto_the_position_before_it(case):
    positions, postings = case
    frozen = dict(positions)
    entries, moved = plan(positions, postings)
    assert positions == frozen  # pure: the input is left as it was
    assert (entries, moved) == plan(positions, postings)  # and the same input gives the same output
    assert [(e.balance_id, e.kind, e.after, e.at, e.source) for e in entries] == [
        (p.balance_id, p.kind, p.after, p.at, p.source) for p in postings
    ]
    reference = dict(positions)  # one posting at a time
    for entry, posting in zip(entries, postings, strict=True):
        current = reference[posting.balance_id]
        assert entry.before == (current.state if posting.before is None else posting.before)
        assert entry.amount == net(entry.after) - net(entry.before)
        state, at = (
            (posting.after, posting.at) if posting.moves_balance else (current.state, current.last_transaction_at)
        )
        reference[posting.balance_id] = Position(state, current.entry_count + 1, at)
    assert moved == {p.balance_id: reference[p.balance_id] for p in postings}


# --- LedgerBatch against deduct / grant / expire_due_grants, one at a time --------------------------

ENTITLEMENTS = [
    EntitlementSpec(id="batch_capped", name="Capped", unit="credit", precision=2, overage_limit=Decimal(5)),
    EntitlementSpec(id="batch_strict", name="Strict", unit="credit", precision=0, overage_enabled=False),
    EntitlementSpec(id="batch_open", name="Open", unit="credit", precision=1),
]
PLAN_ENTITLEMENT = "batch_capped"  # opened in a billing period: a grant that expires and a hard cap


@dataclass(frozen=True)
class Op:
    kind: str  # deduct | grant | expire | both (two deductions, all or nothing)
    balance: int  # index into the customer's balances
    amount: int
    hours: int  # the operation's time, in hours after T0
    expires_in: int | None = None
    other: int = 0
    other_amount: int = 0


ops = st.lists(
    st.one_of(
        st.builds(Op, st.just("deduct"), st.integers(0, 2), st.integers(1, 900), st.integers(0, 20)),
        st.builds(
            Op,
            st.just("grant"),
            st.integers(0, 2),
            st.integers(0, 900),
            st.integers(0, 20),
            st.none() | st.integers(1, 12),
        ),
        st.builds(Op, st.just("expire"), st.integers(0, 2), st.just(0), st.integers(0, 20)),
        st.builds(
            Op,
            st.just("both"),
            st.integers(0, 2),
            st.integers(1, 900),
            st.integers(0, 20),
            other=st.integers(0, 2),
            other_amount=st.integers(1, 900),
        ),
    ),
    min_size=1,
    max_size=25,
).map(lambda drawn: sorted(drawn, key=lambda op: op.hours))  # time only moves forward


def open_balances(db: Database) -> tuple[str, list[int]]:
    """A customer with a balance in each entitlement, the plan's in a period (10 h, 1000 atoms, hard cap 1200)."""
    customer = f"cus_batch_{uuid.uuid4().hex[:10]}"
    with db.write() as session:
        ensure_customer(session, customer, "stripe")
        ids = []
        for spec in ENTITLEMENTS:
            sync_entitlement(session, spec)
            balance = lock_balance(session, customer, spec.id)
            if spec.id == PLAN_ENTITLEMENT:
                terms = PeriodTerms(f"sub_{customer}", "plan", T0, T0 + timedelta(hours=10), 1000, 1200, True, 500)
                start_period(session, balance, terms)
            ids.append(balance.id)
    return customer, ids


def at(op: Op) -> datetime:
    return T0 + timedelta(hours=op.hours)


def source(customer: str, n: int, side: str = "") -> Source:
    return Source(dedupe_key=f"op:{customer}:{n}{side}", description=f"op {n}")


def one_at_a_time(db: Database, customer: str, ids: list[int], operations: list[Op]) -> None:
    """The reference: each operation in its own transaction through the ORM functions; a refusal commits the
    expiry done before it (as the write API does), and `both` is all or nothing in a savepoint."""
    for n, op in enumerate(operations):
        with db.write() as session:
            balance = session.get(Balance, ids[op.balance], with_for_update=True)
            assert balance is not None
            if op.kind == "grant":
                expires = None if op.expires_in is None else at(op) + timedelta(hours=op.expires_in)
                grant(session, balance, op.amount, source_key=f"{customer}:{n}", starts_at=at(op), expires_at=expires)
            elif op.kind == "expire":
                expire_due_grants(session, balance, at(op))
            elif op.kind == "deduct":
                with contextlib.suppress(LedgerRefusal):
                    deduct(session, balance, op.amount, source=source(customer, n), now=at(op))
            else:
                try:
                    with session.begin_nested():
                        deduct(session, balance, op.amount, source=source(customer, n, "a"), now=at(op))
                        other = session.get(Balance, ids[op.other], with_for_update=True)
                        assert other is not None
                        deduct(session, other, op.other_amount, source=source(customer, n, "b"), now=at(op))
                except LedgerRefusal:
                    pass


def as_one_batch(db: Database, customer: str, ids: list[int], operations: list[Op]) -> None:
    """The same operations through one `LedgerBatch`, in one transaction."""
    keys = [(customer, spec.id) for spec in ENTITLEMENTS]
    with db.write() as session:
        batch = LedgerBatch.lock(session, keys)
        assert sorted(batch.accounts) == sorted(ids)
        for n, op in enumerate(operations):
            balance_id = ids[op.balance]
            if op.kind == "grant":
                expires = None if op.expires_in is None else at(op) + timedelta(hours=op.expires_in)
                batch.grant(
                    session, balance_id, op.amount, source_key=f"{customer}:{n}", starts_at=at(op), expires_at=expires
                )
            elif op.kind == "expire":
                batch.expire_due(balance_id, at(op))
            elif op.kind == "deduct":
                with contextlib.suppress(LedgerRefusal):
                    batch.deduct(balance_id, op.amount, source=source(customer, n), now=at(op))
            else:
                saved = batch.checkpoint({balance_id, ids[op.other]})
                try:
                    batch.deduct(balance_id, op.amount, source=source(customer, n, "a"), now=at(op))
                    batch.deduct(ids[op.other], op.other_amount, source=source(customer, n, "b"), now=at(op))
                except LedgerRefusal:
                    batch.rollback(saved)
        writes = Writes()
        batch.write(writes)
        writes.send(session)


def ledger_of(db: Database, customer: str) -> dict[str, object]:
    """Everything both paths must agree on, with the customer's id and database ids taken out."""
    with db.read() as session:
        balances = (
            session.execute(select(Balance).where(Balance.customer_id == customer).order_by(Balance.entitlement_id))
            .scalars()
            .all()
        )
        position = {b.id: b.entitlement_id for b in balances}
        grants = (
            session.execute(
                select(Grant)
                .where(Grant.balance_id.in_(position))
                .order_by(Grant.balance_id, Grant.starts_at, Grant.id)
            )
            .scalars()
            .all()
        )
        grant_names = {g.id: g.source_key.replace(customer, "C") for g in grants}

        def key(dedupe: str | None) -> str | None:
            if dedupe is not None and dedupe.startswith("expiry:"):
                return f"expiry:{grant_names[int(dedupe.split(':')[1])]}"
            return None if dedupe is None else dedupe.replace(customer, "C")

        entries = (
            session.execute(select(LedgerEntry).where(LedgerEntry.balance_id.in_(position)).order_by(LedgerEntry.id))
            .scalars()
            .all()
        )
        return {
            "balances": [(b.entitlement_id, b.balance, b.overage, b.period_used, b.entry_count) for b in balances],
            "grants": [
                (position[g.balance_id], grant_names[g.id], g.amount, g.remaining, g.expires_at, g.expired_at)
                for g in grants
            ],
            "entries": [
                (
                    position[e.balance_id],
                    e.kind,
                    e.amount,
                    e.balance_before,
                    e.balance_after,
                    e.overage_before,
                    e.overage_after,
                    key(e.dedupe_key),
                    e.grant_id is not None and grant_names[e.grant_id],
                    e.description,
                )
                for e in entries
            ],
        }


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=ops)
@example(operations=[Op("deduct", 0, 501, 10)])  # the period's grant expires first: then 501 is past the limit
@example(operations=[Op("grant", 0, 100, 1), Op("deduct", 0, 1050, 2), Op("deduct", 0, 40, 3)])  # oldest first
@example(operations=[Op("both", 0, 100, 1, other=1, other_amount=5), Op("deduct", 0, 7, 2)])  # undone whole
@example(operations=[Op("grant", 2, 50, 0, 2), Op("deduct", 2, 80, 1), Op("grant", 2, 10, 3), Op("expire", 2, 0, 4)])
def test_one_batch_writes_what_one_operation_at_a_time_writes(db, operations):
    reference, reference_ids = open_balances(db)
    batched, batched_ids = open_balances(db)
    assert ledger_of(db, reference) == ledger_of(db, batched)  # identical starts

    one_at_a_time(db, reference, reference_ids, operations)
    as_one_batch(db, batched, batched_ids, operations)

    assert ledger_of(db, batched) == ledger_of(db, reference)
    with db.read() as session:
        assert verify(session) == []


def test_a_rollback_restores_the_balances_it_holds_and_refuses_one_past_a_grant(db):
    customer, ids = open_balances(db)
    with db.write() as session:
        batch = LedgerBatch.lock(session, [(customer, spec.id) for spec in ENTITLEMENTS])
        before = {i: batch.accounts[i].copy() for i in ids}
        saved = batch.checkpoint({ids[0]})
        batch.deduct(ids[0], 300, source=Source(dedupe_key=f"d:{customer}"), now=T0)
        batch.rollback(saved)
        assert batch.postings == [] and batch.accounts[ids[0]] == before[ids[0]]

        saved = batch.checkpoint({ids[0]})
        batch.grant(session, ids[2], 10, source_key=f"{customer}:g", starts_at=T0, expires_at=None)
        try:
            batch.rollback(saved)
        except Exception as error:
            assert "grant" in str(error)
        else:
            raise AssertionError("a rollback past a grant (its row is written) was allowed")
