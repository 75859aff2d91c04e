"""Usage events applied a batch at a time: poison events, failures isolated and dead-lettered, several meters and
entitlements of one customer in one batch, and workers racing over overlapping batches beside the write API."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from conftest import JOBS, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from metering_support import balance_of, new_customer, post_entry, usage_event
from sqlalchemy import func, select

from app.catalogue import MeterSpec
from app.config import get_settings
from app.db import Database, utcnow
from app.ledger.audit import verify
from app.ledger.posting import Posting, Source, post_one
from app.ledger.service import lock_balance
from app.metering import ingest
from app.metering.models import MeterUsage, UsageEvent
from app.metering.service import apply_usage_events
from app.models import Balance, LedgerEntry

CATALOGUE = get_settings().catalogue
# Completions also count against seats: events with two meters on two entitlements, applied all or nothing.
TWO_METERS = replace(
    CATALOGUE,
    meters={
        **CATALOGUE.meters,
        "completion_seats": MeterSpec(key="completion_seats", event_name="completion", entitlement="seats"),
    },
)


def store(db: Database, events: list[dict[str, Any]], catalogue=CATALOGUE) -> list[int]:
    """As ingest stores them (validated), without a worker: the test applies them itself."""
    now = utcnow()
    return ingest.store_batch(db, ingest.parse_batch({"events": events}, catalogue, now), now)


def store_unchecked(db: Database, events: list[dict[str, Any]]) -> list[int]:
    """Stored as an older release stored them, before ingest refused what they carry."""
    now = utcnow()
    return ingest.store_batch(
        db,
        [ingest.NewEvent(e["event_id"], e["customer_id"], e["event_name"], now, e.get("metadata")) for e in events],
        now,
    )


def completion(customer: str, name: str, tokens: Any) -> dict[str, Any]:
    return {
        "event_id": f"{customer}-{name}",
        "customer_id": customer,
        "event_name": "completion",
        "metadata": {"tokens": tokens},
    }


def statuses(db: Database) -> dict[str, int]:
    with db.read() as session:
        return dict(session.execute(select(UsageEvent.status, func.count()).group_by(UsageEvent.status)).all())


def assert_verified(db: Database) -> None:
    with db.read() as session:
        assert verify(session) == []


# --- poison events ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1e-100", 1e-100, "0.000000000000000000001"])
def test_a_value_finer_than_the_meters_precision_is_refused_at_ingest_with_422(db, http, service_headers, value):
    customer = new_customer(db)
    response = http.post(
        "/events/ingest", json={"events": [completion(customer, "poison", value)]}, headers=service_headers
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_amount"
    assert "decimal places" in response.json()["message"]
    assert statuses(db) == {}
    assert store(db, [completion(customer, "fine", "0.00000000000000000001")])  # 20 places: exact, stored


def test_a_stored_poison_value_is_refused_and_its_neighbours_apply(db):
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "100")[0] == 201
    ordinary = store(db, [completion(customer, f"ok{n}", 1500) for n in range(3)])
    poison = store_unchecked(db, [completion(customer, "poison", "1e-100")])  # would not fit meter_usage.consumed
    later = store(db, [completion(customer, "ok3", 500)])

    outcome = apply_usage_events(db, CATALOGUE, ordinary + poison + later)

    assert outcome.counts == {"applied": 4, "refused": 1} and outcome.retry == []
    assert statuses(db) == {"applied": 4, "refused": 1}
    refused = usage_event(db, f"{customer}-poison")
    assert (refused.refusal_code, refused.attempts) == ("invalid_amount", 0)
    assert balance_of(db, customer, "tokens").balance == 10000 - 500
    assert_verified(db)


def test_a_total_that_would_not_fit_its_column_refuses_the_event_not_the_batch(db, monkeypatch):
    """Unreachable with 20 places and 31 digits (at most 52 characters); held to should the precision change."""
    monkeypatch.setattr(ingest, "UNIT_PLACES", 60)
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "100")[0] == 201
    ids = store(db, [completion(customer, "small", "1e-55"), completion(customer, "ok", 1000)])
    ids += store(db, [completion(customer, "large", "1" + "0" * 29), completion(customer, "ok2", 1000)])
    outcome = apply_usage_events(db, CATALOGUE, ids)
    assert outcome.counts == {"applied": 3, "refused": 1}
    large = usage_event(db, f"{customer}-large")
    assert (large.status, large.refusal_code) == ("refused", "invalid_amount")
    assert "digits" in large.refusal_message
    assert_verified(db)


def test_a_sum_stays_exact_past_the_28_digits_of_the_default_decimal_context(db):
    catalogue = replace(CATALOGUE, meters={**CATALOGUE.meters, "fine": MeterSpec(
        key="fine", event_name="fine", entitlement="storage", aggregation="sum", metadata_key="units",
        units_per_credit=Decimal("1e25"))})  # fmt: skip
    customer = new_customer(db)
    assert post_entry(db, "storage", customer, "credit", "10")[0] == 201
    value = "12345678901234567890.00000000000000000001"  # 40 significant digits
    events = [{"event_id": f"{customer}-{n}", "customer_id": customer, "event_name": "fine",
               "metadata": {"units": value}} for n in range(2)]  # fmt: skip
    apply_usage_events(db, catalogue, store(db, events, catalogue))
    with db.read() as session:
        consumed = session.execute(select(MeterUsage.consumed).where(MeterUsage.customer_id == customer)).scalar_one()
    assert consumed == "24691357802469135780.00000000000000000002"


def stray_entry_for(db: Database, event_id: str) -> None:
    """A ledger entry that already holds an event's dedupe key (on another customer's balance): the event's own
    deduction then fails on the unique key, as any database error would, on both databases."""
    other = new_customer(db)
    with db.write() as session:
        balance = lock_balance(session, other, "tokens")
        post_one(
            session,
            balance,
            Posting(
                balance.id,
                "manual_adjustment",
                (0, 0),
                utcnow(),
                Source(dedupe_key=f"usage:{event_id}:completion_tokens"),
            ),
        )


def test_an_event_that_fails_alone_is_isolated_counted_and_dead_lettered_at_the_last_attempt(db):
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "100")[0] == 201
    ids = store(db, [completion(customer, f"e{n}", 1000) for n in range(9)])
    stray_entry_for(db, f"{customer}-e4")
    poison = usage_event(db, f"{customer}-e4").id

    outcome = apply_usage_events(db, CATALOGUE, ids, max_attempts=3)

    assert outcome.counts == {"applied": 8, "retry": 1} and outcome.retry == [poison]
    assert balance_of(db, customer, "tokens").balance == 10000 - 8 * 100  # the others applied at once
    failing = usage_event(db, f"{customer}-e4")
    assert (failing.status, failing.attempts) == ("pending", 1)
    assert "ledger_entries" in failing.last_error and "dedupe_key" in failing.last_error.lower()

    assert apply_usage_events(db, CATALOGUE, ids, max_attempts=3).counts == {"retry": 1}
    assert apply_usage_events(db, CATALOGUE, ids, max_attempts=3).counts == {"failed": 1}
    failed = usage_event(db, f"{customer}-e4")
    assert (failed.status, failed.attempts) == ("failed", 3)
    assert apply_usage_events(db, CATALOGUE, ids, max_attempts=3).counts == {}  # a dead letter stays one
    assert statuses(db) == {"applied": 8, "failed": 1}
    assert_verified(db)


def test_topping_up_takes_other_pending_events_but_not_ones_that_failed_before(db):
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "100")[0] == 201
    mine = store(db, [completion(customer, "mine", 1000)])
    others = store(db, [completion(customer, f"other{n}", 1000) for n in range(3)])
    stray_entry_for(db, f"{customer}-other1")

    outcome = apply_usage_events(db, CATALOGUE, mine, top_up=True)
    assert outcome.counts == {"applied": 3, "retry": 1} and outcome.retry == [others[1]]

    more = store(db, [completion(customer, "more", 1000)])
    assert apply_usage_events(db, CATALOGUE, more, top_up=True).counts == {"applied": 1}  # not others[1] again
    assert usage_event(db, f"{customer}-other1").attempts == 1

    waiting = store(db, [completion(customer, "waiting", 1000)])
    # a message whose events are done already (taken on top of others) does not go looking for more work
    assert apply_usage_events(db, CATALOGUE, mine, top_up=True).counts == {}
    assert usage_event(db, f"{customer}-waiting").status == "pending"
    assert apply_usage_events(db, CATALOGUE, waiting, top_up=True).counts == {"applied": 1}


@pytest.mark.broker
def test_the_worker_applies_a_poisoned_message_and_dead_letters_the_poison(db, worker):
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "100")[0] == 201
    ids = store(db, [completion(customer, f"w{n}", 1000) for n in range(6)])
    stray_entry_for(db, f"{customer}-w2")
    JOBS.enqueue_usage(ids)
    wait_for(lambda: usage_event(db, f"{customer}-w2").status == "failed", what="the poison dead-lettered")
    assert statuses(db) == {"applied": 5, "failed": 1}
    assert usage_event(db, f"{customer}-w2").attempts == get_settings().max_attempts
    assert balance_of(db, customer, "tokens").balance == 10000 - 5 * 100


@pytest.mark.broker
def test_a_poison_the_worker_took_on_top_of_a_message_is_retried_in_its_own_and_dead_lettered(db, worker):
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "100")[0] == 201
    store(db, [completion(customer, "never-rung", 1000)])  # pending, its doorbell lost
    stray_entry_for(db, f"{customer}-never-rung")
    JOBS.enqueue_usage(store(db, [completion(customer, "rung", 1000)]))
    wait_for(lambda: usage_event(db, f"{customer}-never-rung").status == "failed", what="the poison dead-lettered")
    assert usage_event(db, f"{customer}-rung").status == "applied"


# --- one customer, several meters and entitlements, in one batch -------------------------------------

kinds = st.sampled_from(["completion", "seats_reported", "storage_reported", "api_call"])


@st.composite
def usage(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """(event name, value, minutes ago) for a customer's events, in arrival order."""
    return draw(st.lists(st.tuples(kinds, st.integers(0, 2500), st.integers(0, 50)), min_size=1, max_size=30))


def event_of(customer: str, n: int, name: str, value: int, minutes_ago: int, now) -> dict[str, Any]:
    metadata = {
        "completion": {"tokens": value},
        "seats_reported": {"seats": value % 9},
        "storage_reported": {"gb": f"{value / 1000}"},
        "api_call": None,
    }[name]
    return {
        "event_id": f"{customer}-{n}",
        "customer_id": customer,
        "event_name": name,
        "metadata": metadata,
        "timestamp": (now - timedelta(minutes=minutes_ago)).isoformat(),
    }


def open_customer(db: Database) -> str:
    customer = new_customer(db)
    for entitlement, amount in (("tokens", "3"), ("seats", "12"), ("storage", "2")):
        assert post_entry(db, entitlement, customer, "credit", amount)[0] == 201
    return customer


def what_happened(db: Database, customer: str) -> dict[str, Any]:
    """Events' outcomes, entries, balances and aggregates, with the customer's id taken out."""
    with db.read() as session:
        events = session.execute(
            select(UsageEvent.event_id, UsageEvent.status, UsageEvent.refusal_code)
            .where(UsageEvent.customer_id == customer)
            .order_by(UsageEvent.id)
        ).all()
        entries = session.execute(
            select(
                Balance.entitlement_id,
                LedgerEntry.kind,
                LedgerEntry.amount,
                LedgerEntry.balance_before,
                LedgerEntry.balance_after,
                LedgerEntry.overage_before,
                LedgerEntry.overage_after,
                LedgerEntry.dedupe_key,
            )
            .join(Balance, Balance.id == LedgerEntry.balance_id)
            .where(Balance.customer_id == customer, LedgerEntry.usage_event_id.is_not(None))
            .order_by(LedgerEntry.id)
        ).all()
        balances = session.execute(
            select(Balance.entitlement_id, Balance.balance, Balance.overage, Balance.period_used, Balance.entry_count)
            .where(Balance.customer_id == customer)
            .order_by(Balance.entitlement_id)
        ).all()
        usages = session.execute(
            select(
                MeterUsage.meter_key,
                MeterUsage.event_count,
                MeterUsage.consumed,
                MeterUsage.charged,
                MeterUsage.last_event_id,
            )
            .where(MeterUsage.customer_id == customer)
            .order_by(MeterUsage.meter_key)
        ).all()
    strip = customer + "-"
    return {
        "events": [(e.event_id.replace(strip, ""), e.status, e.refusal_code) for e in events],
        "entries": [tuple(str(v).replace(strip, "") for v in entry) for entry in entries],
        "balances": [tuple(b) for b in balances],
        "usages": [
            (u.meter_key, u.event_count, u.consumed, u.charged, (u.last_event_id or "").replace(strip, ""))
            for u in usages
        ],
    }


@settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=usage())
def test_a_customers_events_over_several_meters_in_one_batch_end_as_one_at_a_time(db, drawn):
    now = utcnow()
    batched, reference = open_customer(db), open_customer(db)
    batched_ids = store(db, [event_of(batched, n, *spec, now) for n, spec in enumerate(drawn)], TWO_METERS)
    reference_ids = store(db, [event_of(reference, n, *spec, now) for n, spec in enumerate(drawn)], TWO_METERS)

    apply_usage_events(db, TWO_METERS, batched_ids, now=now)
    for event_id in reference_ids:
        apply_usage_events(db, TWO_METERS, [event_id], now=now)

    assert what_happened(db, batched) == what_happened(db, reference)
    assert_verified(db)


def test_an_event_with_two_meters_is_refused_whole_when_one_entitlement_refuses(db):
    customer = open_customer(db)  # 12 seats, no overage: the 13th completion is refused on seats
    ids = store(db, [completion(customer, f"c{n}", 100) for n in range(14)], TWO_METERS)
    apply_usage_events(db, TWO_METERS, ids)
    happened = what_happened(db, customer)
    assert [status for _, status, _ in happened["events"]] == ["applied"] * 12 + ["refused"] * 2
    assert happened["events"][12][2] == "insufficient_credits"
    assert {key: (count, charged) for key, count, _, charged, _ in happened["usages"]} == {
        "completion_seats": (12, 12),
        "completion_tokens": (12, 120),
    }
    assert balance_of(db, customer, "tokens").balance == 300 - 120  # the refused ones took no tokens either
    assert_verified(db)


# --- concurrency: workers over overlapping batches, and the write API, on the same balances -----------


def test_workers_racing_over_overlapping_batches_beside_the_write_api_apply_each_event_once(db):
    customers = [open_customer(db) for _ in range(5)]
    rng = random.Random(11)
    events = [completion(rng.choice(customers), f"r{n}", rng.randint(1, 400)) for n in range(300)]
    ids = store(db, events, TWO_METERS)
    pool = Database(db.url, pool_size=12)
    debits: list[int] = []

    def worker(n: int) -> None:
        mine = sorted(rng.sample(ids, k=150))  # overlapping redeliveries, in different groupings
        apply_usage_events(pool, TWO_METERS, mine, chunk_size=rng.choice([7, 40, 500]), top_up=n % 2 == 1)

    def write_api(n: int) -> None:
        for k in range(10):
            customer = customers[(n + k) % len(customers)]
            status, _ = post_entry(pool, "tokens" if k % 2 else "seats", customer, "debit", "0.01" if k % 2 else "1")
            debits.append(status)

    try:
        with ThreadPoolExecutor(max_workers=10) as threads:
            futures = [threads.submit(worker, n) for n in range(8)] + [threads.submit(write_api, n) for n in range(2)]
            for future in futures:
                future.result(timeout=300)
        apply_usage_events(pool, TWO_METERS, ids)  # whatever no sample held
    finally:
        pool.dispose()

    counts = statuses(db)
    assert "pending" not in counts and sum(counts.values()) == 300
    with db.read() as session:
        per_event = dict(
            session.execute(
                select(LedgerEntry.usage_event_id, func.count())
                .where(LedgerEntry.usage_event_id.is_not(None))
                .group_by(LedgerEntry.usage_event_id)
            ).all()
        )
        applied = set(session.execute(select(UsageEvent.event_id).where(UsageEvent.status == "applied")).scalars())
    assert set(per_event) <= applied and all(count <= 2 for count in per_event.values())  # one per meter, once
    for customer in customers:
        seats = balance_of(db, customer, "seats")
        assert seats.balance >= 0 and seats.overage == 0
    assert set(debits) <= {201, 400}
    assert_verified(db)


def test_threads_share_nothing_but_the_database(db):
    """The batch keeps no state between calls: two threads given the same events apply each once."""
    customer = open_customer(db)
    ids = store(db, [completion(customer, f"t{n}", 100) for n in range(20)])
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait(timeout=30)
        apply_usage_events(db, CATALOGUE, ids)

    threads = [threading.Thread(target=run) for _ in range(2)]
    [thread.start() for thread in threads]
    [thread.join(timeout=60) for thread in threads]
    assert statuses(db) == {"applied": 20}
    assert balance_of(db, customer, "tokens").balance == 300 - 20 * 10
