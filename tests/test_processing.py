"""Workers applying Stripe events to the ledger: exactly once, in the right order, through crashes."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest
from builders import deliver, event, invoice_paid, subscription_object
from conftest import JOBS, LiveServer, wait_for
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db import Database
from app.inbox.store import sweep
from app.ledger.audit import verify
from app.models import Balance, InboxEvent, LedgerEntry, Subscription
from app.tasks import declare_jobs
from app.web import create_app

pytestmark = pytest.mark.broker

DAY = 86400


def statuses(db: Database) -> dict[str, str]:
    with db.read() as session:
        return dict(session.execute(select(InboxEvent.provider_event_id, InboxEvent.status)).all())


def settle(db: Database, count: int) -> dict[str, str]:
    """Wait until `count` events have left `pending`."""
    return wait_for(
        lambda: (s := statuses(db)) and len(s) == count and "pending" not in s.values() and s,
        what=f"{count} events applied",
    )


def entries(db: Database, customer: str) -> list[tuple[str, int, int, int]]:
    with db.read() as session:
        return [
            tuple(row)
            for row in session.execute(
                select(LedgerEntry.kind, LedgerEntry.amount, LedgerEntry.balance_after, LedgerEntry.overage_after)
                .join(Balance)
                .where(Balance.customer_id == customer)
                .order_by(LedgerEntry.id)
            ).all()
        ]


def subscription(db: Database, sub_id: str) -> Subscription:
    with db.read() as session:
        row = session.get(Subscription, sub_id)
        assert row is not None
        return row


def lifecycle(sub_id: str, customer: str, t0: int, *, step: int) -> list[dict[str, Any]]:
    """created (incomplete) -> paid (active) -> cancel at period end -> deleted, `step` seconds apart."""
    start, end = t0, t0 + 30 * DAY
    return [
        event(
            f"{sub_id}_1",
            "customer.subscription.created",
            subscription_object(sub_id, customer, "incomplete", start, end),
            created=t0,
        ),
        event(
            f"{sub_id}_2",
            "customer.subscription.updated",
            subscription_object(sub_id, customer, "active", start, end),
            created=t0 + step,
            previous_attributes={"status": "incomplete"},
        ),
        event(
            f"{sub_id}_3",
            "customer.subscription.updated",
            subscription_object(sub_id, customer, "active", start, end, cancel_at_period_end=True),
            created=t0 + 2 * step,
            previous_attributes={"cancel_at_period_end": False},
        ),
        event(
            f"{sub_id}_4",
            "customer.subscription.deleted",
            subscription_object(
                sub_id, customer, "canceled", start, end, cancel_at_period_end=True, canceled_at=t0 + 3 * step
            ),
            created=t0 + 3 * step,
        ),
    ]


@pytest.mark.parametrize("step", [7, 0], ids=["seconds-apart", "same-second"])
def test_shuffled_lifecycle_ends_in_the_newest_state(db, http, worker, step):
    t0 = int(time.time()) - 60
    orders = list(itertools.permutations(range(4)))
    random.Random(step).shuffle(orders)
    for n, order in enumerate(orders[:6]):
        events = lifecycle(f"sub_shuffle_{step}_{n}", f"cus_shuffle_{step}_{n}", t0, step=step)
        for index in order:
            assert deliver(http, events[index]).status_code == 200
    settle(db, 6 * 4)
    for n in range(6):
        row = subscription(db, f"sub_shuffle_{step}_{n}")
        assert (row.status, row.cancel_at_period_end) == ("canceled", True), f"order {orders[n]}"


def test_same_second_updates_order_by_what_each_changed_from(db, http, worker):
    t0 = int(time.time()) - 60
    events = lifecycle("sub_causal", "cus_causal", t0, step=0)[:3]  # no terminal event to decide it
    for payload in reversed(events):
        deliver(http, payload)
    settle(db, 3)
    row = subscription(db, "sub_causal")
    assert (row.status, row.cancel_at_period_end, row.watermark_event_id) == ("active", True, "sub_causal_3")


@pytest.mark.parametrize("api", ["2025-03-31", "2024-06-20"])
def test_a_paid_renewal_grants_the_new_period_once(db, http, worker, api):
    now = int(time.time())
    p1, p2, p3 = now - 10 * DAY, now + 20 * DAY, now + 50 * DAY
    created = event(
        "evt_r1",
        "customer.subscription.created",
        subscription_object("sub_r", "cus_r", "active", p1, p2, api=api),
        created=now - 10 * DAY,
    )
    deliver(http, created)
    settle(db, 1)
    assert entries(db, "cus_r") == [("grant", 5000, 5000, 0)]

    renewal = event(
        "evt_r2",
        "customer.subscription.updated",
        subscription_object("sub_r", "cus_r", "active", p2, p3, api=api),
        created=now,
        previous_attributes={"current_period_start": p1, "current_period_end": p2},
    )
    paid = invoice_paid("evt_r3", "sub_r", "cus_r", p2, p3, created=now, api=api)
    deliveries = [renewal, paid] * 3
    random.Random(3).shuffle(deliveries)
    with ThreadPoolExecutor(max_workers=6) as pool:
        assert {r.status_code for r in pool.map(lambda p: deliver(http, p), deliveries)} == {200}
    # A late invoice for the first period changes nothing either.
    deliver(http, invoice_paid("evt_r0", "sub_r", "cus_r", p1, p2, created=now - 10 * DAY, api=api))
    settle(db, 4)
    assert entries(db, "cus_r") == [("grant", 5000, 5000, 0), ("expiry", -5000, 0, 0), ("grant", 5000, 5000, 0)]
    with db.read() as session:
        balance = session.execute(select(Balance).where(Balance.customer_id == "cus_r")).scalar_one()
        assert balance.period_start is not None and int(balance.period_start.timestamp()) == p2
        assert verify(session) == []


def test_twenty_parallel_deliveries_have_one_effect(db, http, worker):
    now = int(time.time())
    payload = event(
        "evt_once",
        "customer.subscription.created",
        subscription_object("sub_once", "cus_once", "active", now, now + 30 * DAY),
    )
    with ThreadPoolExecutor(max_workers=20) as pool:
        assert {r.status_code for r in pool.map(lambda _: deliver(http, payload), range(20))} == {200}
    settle(db, 1)
    assert entries(db, "cus_once") == [("grant", 5000, 5000, 0)]


class CrashBeforeCommit:
    """Fails the commit of any transaction that wrote ledger entries, `times` times: a worker dying
    after its ledger writes but before they are durable."""

    def __init__(self, times: int):
        self.remaining = times

    def after_flush(self, session: Session, _context: object) -> None:
        if any(isinstance(obj, LedgerEntry) for obj in session.new):
            session.info["wrote_ledger"] = True

    def before_commit(self, session: Session) -> None:
        if session.info.pop("wrote_ledger", False) and self.remaining > 0:
            self.remaining -= 1
            raise RuntimeError("simulated crash after the ledger write, before commit")


@pytest.fixture
def crash() -> Iterator[type[CrashBeforeCommit]]:
    installed: list[CrashBeforeCommit] = []

    def install(times: int) -> CrashBeforeCommit:
        hook = CrashBeforeCommit(times)
        sa_event.listen(Session, "after_flush", hook.after_flush)
        sa_event.listen(Session, "before_commit", hook.before_commit)
        installed.append(hook)
        return hook

    yield install  # type: ignore[misc]
    for hook in installed:
        sa_event.remove(Session, "after_flush", hook.after_flush)
        sa_event.remove(Session, "before_commit", hook.before_commit)


def test_a_crash_mid_event_is_retried_and_applied_once(db, http, worker, crash):
    crash(times=2)
    now = int(time.time())
    deliver(
        http,
        event(
            "evt_crash",
            "customer.subscription.created",
            subscription_object("sub_crash", "cus_crash", "active", now, now + 30 * DAY),
        ),
    )
    assert settle(db, 1) == {"evt_crash": "processed"}
    with db.read() as session:
        stored = session.execute(select(InboxEvent)).scalar_one()
        assert stored.attempts == 3
        assert verify(session) == []
    assert entries(db, "cus_crash") == [("grant", 5000, 5000, 0)]


def test_exhausted_retries_dead_letter_the_event_and_replay_applies_it(db, http, worker, crash):
    crash(times=get_settings().max_attempts)
    now = int(time.time())
    deliver(
        http,
        event(
            "evt_dead",
            "customer.subscription.created",
            subscription_object("sub_dead", "cus_dead", "active", now, now + 30 * DAY),
        ),
    )
    assert settle(db, 1) == {"evt_dead": "failed"}
    with db.read() as session:
        failed = session.execute(select(InboxEvent)).scalar_one()
    assert failed.attempts == get_settings().max_attempts
    assert "simulated crash" in (failed.last_error or "")
    assert entries(db, "cus_dead") == []

    from app.inbox.store import replay

    assert replay(db, JOBS.enqueue_event, failed.id) is True
    assert settle(db, 1) == {"evt_dead": "processed"}
    assert entries(db, "cus_dead") == [("grant", 5000, 5000, 0)]


def test_an_authenticated_but_malformed_payload_is_dead_lettered_not_retried(db, http, worker):
    bad = event(
        "evt_bad",
        "customer.subscription.updated",
        {"id": "sub_bad", "object": "subscription", "customer": "cus_bad", "status": "exploded"},
    )
    assert deliver(http, bad).status_code == 200
    assert settle(db, 1) == {"evt_bad": "failed"}
    with db.read() as session:
        failed = session.execute(select(InboxEvent)).scalar_one()
        assert failed.attempts == 1
        assert "unknown subscription status" in (failed.last_error or "")
        assert session.get(Subscription, "sub_bad") is None


def test_unknown_types_are_skipped_not_failed(db, http, worker):
    deliver(
        http,
        {
            "id": "evt_other",
            "object": "event",
            "type": "charge.refunded",
            "created": int(time.time()),
            "data": {"object": {"id": "ch_1"}},
        },
    )
    assert settle(db, 1) == {"evt_other": "skipped"}


def test_broker_down_still_acknowledges_and_the_sweeper_delivers_later(db, worker):
    dead_broker = RedisBroker(url="redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    app = create_app(get_settings(), jobs=declare_jobs(dead_broker, get_settings(), db), run_workers=False)
    now = int(time.time())
    with LiveServer(app) as live, httpx.Client(base_url=live.url) as client:
        response = deliver(
            client,
            event(
                "evt_nobroker",
                "customer.subscription.created",
                subscription_object("sub_nb", "cus_nb", "active", now, now + 30 * DAY),
            ),
        )
        assert response.status_code == 200
        assert client.get("/readyz").status_code == 503
    time.sleep(0.2)
    assert statuses(db) == {"evt_nobroker": "pending"}  # safe in the inbox, nobody rang
    assert sweep(db, JOBS.enqueue_event, older_than=timedelta(0)) == 1
    assert settle(db, 1) == {"evt_nobroker": "processed"}
    assert entries(db, "cus_nb") == [("grant", 5000, 5000, 0)]
