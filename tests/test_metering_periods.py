"""Stripe plans under metering: usage against the period's credits and hard cap, period ends, usage history."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import dodopayments
import pytest
from builders import deliver, event, invoice_paid, subscription_object
from conftest import SERVICE_TOKEN, wait_for
from metering_support import balance_of, post_entry
from sqlalchemy import select

from app.db import utcnow
from app.ledger.audit import verify
from app.ledger.service import expire_all_due
from app.models import Balance, LedgerEntry

DAY = 86400


def subscribe(http, db, *, start: int, end: int) -> tuple[str, str]:
    customer, sub = f"cus_{uuid.uuid4().hex[:8]}", f"sub_{uuid.uuid4().hex[:8]}"
    response = deliver(
        http,
        event(f"evt_{sub}", "customer.subscription.created", subscription_object(sub, customer, "active", start, end)),
    )
    assert response.status_code == 200
    wait_for(lambda: balance_of(db, customer, "requests"), what="the plan's balance")
    return customer, sub


def kinds(db, customer: str) -> list[tuple[str, int]]:
    """The customer's ledger entries, oldest first, as (kind, amount)."""
    with db.read() as session:
        return [
            (entry.kind, entry.amount)
            for entry in session.execute(
                select(LedgerEntry)
                .join(Balance, Balance.id == LedgerEntry.balance_id)
                .where(Balance.customer_id == customer)
                .order_by(LedgerEntry.id)
            ).scalars()
        ]


def usage(http, customer: str) -> dict:
    return http.get(
        "/usage", params={"customer_id": customer}, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}
    ).json()


@pytest.mark.broker
def test_renewal_expires_the_unused_grant_and_grants_the_new_period(db, http, worker):
    now = int(time.time())
    customer, sub = subscribe(http, db, start=now - 3600, end=now + 30 * DAY)
    assert post_entry(db, "requests", customer, "debit", "4000")[0] == 201
    assert usage(http, customer)["credits"]["used"] == 4000

    deliver(http, invoice_paid(f"evt_renew_{sub}", sub, customer, now + 30 * DAY, now + 60 * DAY))
    wait_for(lambda: ("grant", 5000) in kinds(db, customer)[2:], what="the renewal grant")
    assert kinds(db, customer) == [("grant", 5000), ("manual_adjustment", -4000), ("expiry", -1000), ("grant", 5000)]
    credits = usage(http, customer)["credits"]
    assert (credits["used"], credits["remaining"], credits["included"]) == (0, 5000, 5000)
    with db.read() as session:
        assert verify(session) == []


@pytest.mark.broker
def test_the_clock_resets_overage_when_a_period_ends_without_renewal(db, http, worker):
    now = int(time.time())
    customer, _ = subscribe(http, db, start=now - 3600, end=now + DAY)
    assert post_entry(db, "requests", customer, "debit", "5100")[0] == 201
    assert usage(http, customer)["credits"]["in_overage"] is True

    with db.write() as session:
        expire_all_due(session, datetime.fromtimestamp(now + DAY + 1, UTC))
    assert kinds(db, customer)[-1] == ("overage_reset", 100)
    balance = balance_of(db, customer, "requests")
    assert (balance.balance, balance.overage) == (0, 0)
    with db.read() as session:
        assert verify(session) == []


@pytest.mark.broker
def test_usage_counts_against_the_hard_cap_of_the_period(db, http, worker):
    now = int(time.time())
    customer, _ = subscribe(http, db, start=now - 3600, end=now + 30 * DAY)
    status, body = post_entry(db, "requests", customer, "debit", "6001")
    assert status == 400 and body["code"] == "limit_exceeded"
    assert post_entry(db, "requests", customer, "debit", "6000")[0] == 201
    document = usage(http, customer)
    assert document["usage_status"] == "limit_reached" and document["credits"]["overage"] == 1000


@pytest.mark.broker
def test_usage_history_parses_with_the_official_sdk(db, http, worker, server, service_headers):
    now = int(time.time())
    customer, sub = subscribe(http, db, start=now - 3600, end=now + 30 * DAY)
    batch = [{"event_id": f"{sub}-{n}", "customer_id": customer, "event_name": "api_call"} for n in range(150)]
    assert http.post("/events/ingest", json={"events": batch}, headers=service_headers).json() == {
        "ingested_count": 150
    }
    wait_for(lambda: balance_of(db, customer, "requests").period_used == 150, what="150 events applied")

    deliver(http, invoice_paid(f"evt_renew_{sub}", sub, customer, now + 30 * DAY, now + 60 * DAY))
    wait_for(
        lambda: (
            balance_of(db, customer, "requests").period_included == 5000
            and balance_of(db, customer, "requests").period_used == 0
        ),
        what="the second period",
    )
    more = [{"event_id": f"{sub}-p2-{n}", "customer_id": customer, "event_name": "api_call"} for n in range(5)]
    http.post("/events/ingest", json={"events": more}, headers=service_headers)
    wait_for(lambda: balance_of(db, customer, "requests").period_used == 5, what="5 events in period 2")

    client = dodopayments.DodoPayments(bearer_token=SERVICE_TOKEN, base_url=server.url, max_retries=0)
    page = client.subscriptions.retrieve_usage_history(sub)
    assert [item.start_date for item in page.items] == [
        datetime.fromtimestamp(now + 30 * DAY, UTC),
        datetime.fromtimestamp(now - 3600, UTC),
    ]
    newest, first = page.items
    meter = first.meters[0]
    assert (meter.id, meter.name, meter.currency) == ("api_calls", "API calls", "USD")
    assert (meter.consumed_units, meter.free_threshold, meter.chargeable_units) == ("150", 100, "50")
    assert (meter.price_per_unit, meter.total_price) == ("0.01", 50)
    assert (newest.meters[0].consumed_units, newest.meters[0].chargeable_units, newest.meters[0].total_price) == (
        "5",
        "0",
        0,
    )

    later = client.subscriptions.retrieve_usage_history(sub, start_date=datetime.fromtimestamp(now + 40 * DAY, UTC))
    assert [item.start_date for item in later.items] == [datetime.fromtimestamp(now + 30 * DAY, UTC)]
    second_page = client.subscriptions.retrieve_usage_history(sub, page_size=1, page_number=1)
    assert [item.start_date for item in second_page.items] == [datetime.fromtimestamp(now - 3600, UTC)]
    assert client.subscriptions.retrieve_usage_history(sub, meter_id="api_calls").items[0].meters[0].id == "api_calls"
    with pytest.raises(dodopayments.UnprocessableEntityError):
        client.subscriptions.retrieve_usage_history(sub, page_size=101)
    with pytest.raises(dodopayments.UnprocessableEntityError):
        client.subscriptions.retrieve_usage_history(sub, meter_id="no_such_meter")
    with pytest.raises(dodopayments.NotFoundError):
        client.subscriptions.retrieve_usage_history("sub_nobody")


def test_usage_history_is_private_to_the_subscriptions_customer(db, http):
    from metering_support import new_customer

    from app.keys import create_key
    from app.models import Subscription

    owner, other = new_customer(db), new_customer(db)
    with db.write() as session:
        session.add(
            Subscription(
                id="sub_private",
                provider="stripe",
                customer_id=owner,
                status="active",
                current_period_start=utcnow() - timedelta(days=1),
                current_period_end=utcnow() + timedelta(days=29),
            )
        )
    own = create_key(db, scope="customer", customer_id=owner)
    foreign = create_key(db, scope="customer", customer_id=other)
    assert (
        http.get("/subscriptions/sub_private/usage-history", headers={"Authorization": f"Bearer {own}"}).status_code
        == 200
    )
    assert (
        http.get("/subscriptions/sub_private/usage-history", headers={"Authorization": f"Bearer {foreign}"}).status_code
        == 403
    )
    assert http.get("/subscriptions/sub_private/usage-history").status_code == 401
