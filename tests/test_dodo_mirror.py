"""The mirrored Dodo ledger: arrival order and duplicates never change the outcome, gaps are recorded
(not guessed) and reported by `tally verify` as known, amounts with 10 decimal places are exact."""

from __future__ import annotations

import itertools
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from dodo_builders import apply_now, iso, ledger_entry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from app.cli import main as tally
from app.ledger.amounts import to_atoms
from app.ledger.audit import verify
from app.ledger.mirror import Link, order_chain
from app.models import Balance, InboxEvent, LedgerEntry, ProviderLedgerEntry

CE = "cde_mirror"
BASE = datetime(2026, 3, 1, tzinfo=UTC)
Q = Decimal("0.0000000001")


@dataclass(frozen=True)
class Step:
    payload: dict
    after: tuple[Decimal, Decimal]


def dodo_chain(customer: str, operations: list[tuple[str, Decimal, bool]]) -> list[Step]:
    """Entries as Dodo writes them from (operation, amount, same-instant-as-previous) triples.

    A deduction larger than the balance is split in two entries of one instant: what the balance
    covers (credit_deducted) and the rest (overage_charged), the case where arrival order is most
    ambiguous.
    """
    balance = overage = Decimal(0)
    moment = BASE
    steps: list[Step] = []

    def add(kind: str, amount: Decimal, new_balance: Decimal, new_overage: Decimal) -> None:
        nonlocal balance, overage
        entry_id = f"cle_{customer}_{len(steps):03d}"
        payload = ledger_entry(
            entry_id, customer, CE, kind, amount, (balance, overage), (new_balance, new_overage), iso(moment)
        )
        balance, overage = new_balance, new_overage
        steps.append(Step(payload, (balance, overage)))

    for index, (operation, amount, same_instant) in enumerate(operations):
        if index and not same_instant:
            moment += timedelta(seconds=1)
        if operation == "add":
            add("credit_added", amount, balance + amount, overage)
        elif operation == "deduct":
            covered = min(balance, amount)
            if covered:
                add("credit_deducted", covered, balance - covered, overage)
            if amount - covered:
                add("overage_charged", amount - covered, balance, overage + amount - covered)
        elif operation == "reset" and overage:
            add("overage_reset", overage, balance, Decimal(0))
    return steps


def balance_of(db, customer: str) -> Balance:
    with db.read() as session:
        return session.execute(select(Balance).where(Balance.customer_id == customer)).scalar_one()


def atoms(state: tuple[Decimal, Decimal]) -> tuple[int, int]:
    return to_atoms(state[0], 10), to_atoms(state[1], 10)


amounts = st.decimals(min_value=Decimal("0.0000000001"), max_value=Decimal("100000"), places=10)
operations = st.lists(
    st.tuples(st.sampled_from(["add", "deduct", "deduct", "reset"]), amounts, st.booleans()), min_size=1, max_size=12
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=operations, data=st.data())
def test_any_arrival_order_with_duplicates_ends_at_the_ordered_balance(db, operations, data):
    customer = f"cus_{uuid.uuid4().hex[:12]}"
    steps = dodo_chain(customer, operations)
    if not steps:
        return
    deliveries = [(step.payload, f"msg_{customer}_{index}") for index, step in enumerate(steps)]
    deliveries += data.draw(st.lists(st.sampled_from(deliveries), max_size=4), label="redelivered")
    shuffled = data.draw(st.permutations(deliveries), label="arrival order")
    for payload, webhook_id in shuffled:
        assert apply_now(db, payload, webhook_id) in {"processed", "duplicate"}

    balance = balance_of(db, customer)
    assert (balance.balance, balance.overage) == atoms(steps[-1].after)
    assert balance.entry_count == len(steps)
    with db.read() as session:
        gaps = session.execute(
            select(ProviderLedgerEntry).where(
                ProviderLedgerEntry.balance_id == balance.id, ProviderLedgerEntry.follows_gap.is_(True)
            )
        ).all()
        assert gaps == []
        positions = (
            session.execute(
                select(ProviderLedgerEntry.external_id)
                .where(ProviderLedgerEntry.balance_id == balance.id)
                .order_by(ProviderLedgerEntry.chain_position)
            )
            .scalars()
            .all()
        )
        assert positions == [step.payload["data"]["id"] for step in steps]
        assert [problem for problem in verify(session) if customer in problem] == []


def test_several_seeded_shuffles_of_one_long_sequence_agree(db):
    rng = random.Random(20260301)
    ops = [
        (rng.choice(["add", "deduct", "deduct", "reset"]), Decimal(rng.randint(1, 10**12)) * Q, rng.random() < 0.3)
        for _ in range(60)
    ]
    finals = set()
    for seed in range(5):
        customer = f"cus_seed{seed}"
        steps = dodo_chain(customer, ops)
        order = list(enumerate(steps))
        random.Random(seed).shuffle(order)
        for index, step in order:
            assert apply_now(db, step.payload, f"msg_seed{seed}_{index}") == "processed"
        balance = balance_of(db, customer)
        finals.add((balance.balance, balance.overage))
        assert (balance.balance, balance.overage) == atoms(steps[-1].after)
    assert len(finals) == 1
    with db.read() as session:
        assert verify(session) == []


def test_ordering_depends_only_on_the_set_of_entries():
    moment = BASE
    links = [
        Link("b", moment, (10, 0), (5, 0)),
        Link("a", moment, (5, 0), (10, 0)),
        Link("c", moment, (10, 0), (7, 0)),
        Link("d", moment + timedelta(seconds=1), (7, 0), (7, 3)),
    ]
    orders = {
        tuple(placed.link.key for placed in order_chain(list(perm), start=(10, 0)))
        for perm in itertools.permutations(links)
    }
    assert len(orders) == 1
    (only,) = orders
    placed = order_chain(links, start=(10, 0))
    assert [item.expected_before for item in placed] == [None] * 4, only  # an unbroken chain exists and is found


def test_ten_decimal_places_are_exact_end_to_end(db, service_headers, http):
    steps = [
        ledger_entry(
            "cle_exact_1",
            "cus_exact",
            CE,
            "credit_added",
            "12345678.1234567891",
            ("0", "0"),
            ("12345678.1234567891", "0"),
            "2026-03-01T00:00:00.000001Z",
        ),
        ledger_entry(
            "cle_exact_2",
            "cus_exact",
            CE,
            "credit_deducted",
            "0.0000000001",
            ("12345678.1234567891", "0"),
            ("12345678.123456789", "0"),
            "2026-03-01T00:00:00.000002Z",
        ),
        ledger_entry(
            "cle_exact_3",
            "cus_exact",
            CE,
            "overage_charged",
            "0.3333333333",
            ("12345678.123456789", "0"),
            ("12345678.123456789", "0.3333333333"),
            "2026-03-01T00:00:01Z",
        ),
    ]
    for index, payload in enumerate(reversed(steps)):
        assert apply_now(db, payload, f"msg_exact_{index}") == "processed"
    balance = balance_of(db, "cus_exact")
    assert (balance.balance, balance.overage) == (123456781234567890, 3333333333)
    response = http.get(f"/credit-entitlements/{CE}/balances/cus_exact", headers=service_headers)
    assert response.status_code == 200
    assert (response.json()["balance"], response.json()["overage"]) == ("12345678.1234567890", "0.3333333333")


def test_more_than_ten_decimal_places_dead_letters_the_event(db):
    payload = ledger_entry(
        "cle_fine",
        "cus_fine",
        CE,
        "credit_added",
        "0.00000000001",
        ("0", "0"),
        ("0.00000000001", "0"),
        "2026-03-01T00:00:00Z",
    )
    assert apply_now(db, payload, "msg_fine") == "failed"
    with db.read() as session:
        event = session.execute(select(InboxEvent)).scalar_one()
        assert "decimal places" in event.last_error
        assert session.execute(select(LedgerEntry)).first() is None


def gap_chain(customer: str) -> list[dict]:
    return [
        ledger_entry(
            f"cle_{customer}_1", customer, CE, "credit_added", "100", ("0", "0"), ("100", "0"), "2026-03-01T00:00:00Z"
        ),
        ledger_entry(
            f"cle_{customer}_2",
            customer,
            CE,
            "credit_deducted",
            "30",
            ("100", "0"),
            ("70", "0"),
            "2026-03-01T00:00:01Z",
        ),
        ledger_entry(
            f"cle_{customer}_3", customer, CE, "credit_deducted", "20", ("70", "0"), ("50", "0"), "2026-03-01T00:00:02Z"
        ),
    ]


def test_a_missing_link_is_recorded_not_guessed_and_cleared_when_it_arrives(db, capsys):
    first, middle, last = gap_chain("cus_gap")
    assert apply_now(db, last, "msg_gap_3") == "processed"
    assert apply_now(db, first, "msg_gap_1") == "processed"
    balance = balance_of(db, "cus_gap")
    assert (balance.balance, balance.overage) == (to_atoms("50", 10), 0)  # the newest entry's after
    with db.read() as session:
        gap = session.execute(select(ProviderLedgerEntry).where(ProviderLedgerEntry.follows_gap.is_(True))).scalar_one()
        assert gap.external_id == "cle_cus_gap_3"
        assert (gap.expected_balance_before, gap.expected_overage_before) == (to_atoms("100", 10), 0)
        assert verify(session) == []  # a recorded gap is known, not corruption

    assert tally(["verify"]) == 0
    out = capsys.readouterr().out
    assert "known gap before provider entry cle_cus_gap_3" in out

    assert apply_now(db, middle, "msg_gap_2") == "processed"
    with db.read() as session:
        assert session.execute(select(ProviderLedgerEntry).where(ProviderLedgerEntry.follows_gap.is_(True))).all() == []
    assert tally(["verify"]) == 0
    assert "known gap" not in capsys.readouterr().out


def test_mirroring_that_starts_mid_ledger_records_the_gap_from_zero(db):
    _first, middle, _last = gap_chain("cus_late")
    assert apply_now(db, middle, "msg_late_2") == "processed"
    with db.read() as session:
        row = session.execute(select(ProviderLedgerEntry)).scalar_one()
        assert row.follows_gap and (row.expected_balance_before, row.expected_overage_before) == (0, 0)
    assert (balance_of(db, "cus_late").balance) == to_atoms("70", 10)


def test_verify_fails_on_a_real_breach_of_a_mirrored_balance(db, capsys):
    for index, payload in enumerate(gap_chain("cus_breach")):
        assert apply_now(db, payload, f"msg_breach_{index}") == "processed"
    with db.write() as session:
        session.execute(update(Balance).where(Balance.customer_id == "cus_breach").values(balance=1))
    assert tally(["verify"]) == 1
    assert "the newest provider entry ends at" in capsys.readouterr().out

    with db.write() as session:  # restore the balance, then hide a gap the chain does not show
        session.execute(update(Balance).where(Balance.customer_id == "cus_breach").values(balance=to_atoms("50", 10)))
        session.execute(
            update(ProviderLedgerEntry)
            .where(ProviderLedgerEntry.external_id == "cle_cus_breach_2")
            .values(follows_gap=True, expected_balance_before=5, expected_overage_before=0)
        )
    assert tally(["verify"]) == 1
    assert "no longer there" in capsys.readouterr().out


def test_the_same_provider_entry_under_two_webhook_ids_is_mirrored_once(db):
    payload = gap_chain("cus_twice")[0]
    assert apply_now(db, payload, "msg_twice_a") == "processed"
    assert apply_now(db, payload, "msg_twice_b") == "processed"
    with db.read() as session:
        assert len(session.execute(select(LedgerEntry)).all()) == 1
    assert balance_of(db, "cus_twice").entry_count == 1
