"""POST /events/ingest, the workers that apply usage events, and what each meter deducts."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from builders import deliver, event, subscription_object
from conftest import wait_for
from metering_support import balance_of, entry_count, new_customer, post_entry, usage_event, usage_event_count

from app.config import get_settings
from app.db import utcnow
from app.keys import create_key
from app.metering import ingest
from app.metering.service import apply_usage_events, credits_for
from app.models import Balance, CreditEntitlement

CATALOGUE = get_settings().catalogue


def ingest_directly(db, events: list[dict[str, Any]]) -> list[int]:
    """Store events as the route does, without a worker: the test applies them itself."""
    now = utcnow()
    return ingest.store_batch(db, ingest.parse_batch({"events": events}, CATALOGUE, now), now)


def apply(db, ids: list[int]) -> None:
    apply_usage_events(db, CATALOGUE, ids)


def usage_of(http, headers, customer_id: str) -> dict[str, Any]:
    response = http.get("/usage", params={"customer_id": customer_id}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def subscribe(http, customer_id: str, sub_id: str) -> None:
    now = int(time.time())
    response = deliver(
        http,
        event(
            f"evt_{sub_id}",
            "customer.subscription.created",
            subscription_object(sub_id, customer_id, "active", now - 3600, now + 30 * 86400),
        ),
    )
    assert response.status_code == 200


@pytest.mark.broker
def test_ingested_events_are_counted_once_and_deducted_by_the_workers(db, http, worker, service_headers):
    customer = f"cus_{uuid.uuid4().hex[:8]}"
    subscribe(http, customer, f"sub_{customer}")
    wait_for(lambda: balance_of(db, customer, "requests"), what="the plan's balance")

    batch = [
        {
            "event_id": f"{customer}-{n}",
            "customer_id": customer,
            "event_name": "api_call",
            "metadata": {"endpoint": "/v1/things"},
        }
        for n in range(3)
    ]
    response = http.post("/events/ingest", json={"events": batch}, headers=service_headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"ingested_count": 3}

    newcomer = {"event_id": f"{customer}-3", "customer_id": customer, "event_name": "api_call"}
    again = [*batch, {**newcomer, "timestamp": utcnow().isoformat()}]
    response = http.post("/events/ingest", json={"events": again}, headers=service_headers)
    assert response.json() == {"ingested_count": 1}

    wait_for(lambda: usage_of(http, service_headers, customer)["credits"]["used"] == 4, what="4 credits used")
    credits = usage_of(http, service_headers, customer)["credits"]
    assert credits["remaining"] == 4996 and credits["overage"] == 0
    assert entry_count(db, kind="deduction") == 4
    assert usage_event(db, f"{customer}-0").status == "applied"


def _event(customer: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "customer_id": customer, "event_name": "api_call", **fields}


BAD_BATCHES = {
    "1001 events": lambda c: {"events": [_event(c) for _ in range(1001)]},
    "duplicate event_id": lambda c: {"events": [_event(c, event_id="same"), _event(c, event_id="same")]},
    "unknown customer": lambda c: {"events": [_event(c), _event("cus_nobody")]},
    "unknown meter": lambda c: {"events": [_event(c, event_name="no_such_meter")]},
    "negative amount": lambda c: {"events": [_event(c, event_name="completion", metadata={"tokens": -5})]},
    "non-numeric amount": lambda c: {"events": [_event(c, event_name="completion", metadata={"tokens": "many"})]},
    "missing amount": lambda c: {"events": [_event(c, event_name="completion", metadata={"model": "x"})]},
    "boolean amount": lambda c: {"events": [_event(c, event_name="completion", metadata={"tokens": True})]},
    "nested metadata": lambda c: {"events": [_event(c, metadata={"a": {"b": 1}})]},
    "timestamp too old": lambda c: {"events": [_event(c, timestamp=(utcnow() - timedelta(hours=2)).isoformat())]},
    "timestamp in the future": lambda c: {"events": [_event(c, timestamp=(utcnow() + timedelta(hours=1)).isoformat())]},
    "bad timestamp": lambda c: {"events": [_event(c, timestamp="yesterday")]},
    "missing event_id": lambda c: {"events": [{"customer_id": c, "event_name": "api_call"}]},
    "events not a list": lambda c: {"events": {"event_id": "x"}},
    "no events key": lambda c: {"event": []},
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_a_bad_batch_is_refused_whole_and_nothing_is_stored(db, http, service_headers, case):
    customer = new_customer(db)
    good = _event(customer)
    payload = BAD_BATCHES[case](customer)
    if isinstance(payload.get("events"), list) and case != "1001 events":
        payload["events"].insert(0, good)  # a valid neighbour must not be stored either
    response = http.post("/events/ingest", json=payload, headers=service_headers)
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert set(body) == {"code", "message"} and body["message"]
    assert usage_event_count(db) == 0


def test_ingest_refuses_malformed_json_missing_tokens_and_customer_tokens(db, http, service_headers):
    customer = new_customer(db)
    response = http.post("/events/ingest", content=b"{not json", headers=service_headers)
    assert response.status_code == 400 and response.json()["code"] == "invalid_json"
    assert http.post("/events/ingest", json={"events": [_event(customer)]}).status_code == 401
    token = create_key(db, scope="customer", customer_id=customer)
    response = http.post(
        "/events/ingest", json={"events": [_event(customer)]}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 403
    assert usage_event_count(db) == 0


def test_an_event_without_a_balance_is_refused_and_stays_refused(db):
    customer = new_customer(db)
    first = {
        "event_id": f"{customer}-seat",
        "customer_id": customer,
        "event_name": "seats_reported",
        "metadata": {"seats": 2},
    }
    apply(db, ingest_directly(db, [first]))
    refused = usage_event(db, first["event_id"])
    assert refused.status == "refused" and refused.refusal_code == "no_balance"

    assert post_entry(db, "seats", customer, "credit", "10")[0] == 201  # now the customer has seats
    assert ingest_directly(db, [first]) == []  # a redelivery is absorbed: nothing new stored
    apply(db, [refused.id])  # and a redelivered broker message changes nothing
    assert usage_event(db, first["event_id"]).status == "refused"
    assert balance_of(db, customer, "seats").balance == 10
    assert entry_count(db, usage_event_id=first["event_id"]) == 0


def test_a_deduction_past_the_overage_limit_is_refused_whole_and_stays_refused(db):
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "10")[0] == 201  # 10 credits, overage limit 5
    ids = ingest_directly(
        db,
        [
            {
                "event_id": f"{customer}-a",
                "customer_id": customer,
                "event_name": "completion",
                "metadata": {"tokens": 12000},
            },
            {
                "event_id": f"{customer}-b",
                "customer_id": customer,
                "event_name": "completion",
                "metadata": {"tokens": 3001},
            },
            {
                "event_id": f"{customer}-c",
                "customer_id": customer,
                "event_name": "completion",
                "metadata": {"tokens": 3000},
            },
        ],
    )
    apply(db, ids)
    balance = balance_of(db, customer, "tokens")
    # a: 12 credits = 10 from the balance + 2 overage; b: 3.01 more would reach 5.01 > 5: refused whole;
    # c: 3 more reaches exactly the limit.
    assert [usage_event(db, f"{customer}-{x}").status for x in "abc"] == ["applied", "refused", "applied"]
    assert usage_event(db, f"{customer}-b").refusal_code == "limit_exceeded"
    assert (balance.balance, balance.overage) == (0, 500)

    assert post_entry(db, "tokens", customer, "credit", "100")[0] == 201  # plenty of room now
    apply(db, ids)
    assert usage_event(db, f"{customer}-b").status == "refused"
    assert balance_of(db, customer, "tokens").balance == 10000


def test_overage_disabled_refuses_what_the_balance_cannot_cover(db):
    customer = new_customer(db)
    post_entry(db, "seats", customer, "credit", "3")
    ids = ingest_directly(
        db,
        [
            {
                "event_id": f"{customer}-s",
                "customer_id": customer,
                "event_name": "seats_reported",
                "metadata": {"seats": 4},
            }
        ],
    )
    apply(db, ids)
    assert usage_event(db, f"{customer}-s").refusal_code == "insufficient_credits"
    assert balance_of(db, customer, "seats").balance == 3


def test_sum_charges_the_running_total_rounded_up_to_the_precision(db):
    customer = new_customer(db)
    post_entry(db, "tokens", customer, "credit", "10")
    for n, tokens in enumerate([1500, 1, 8, "0.5"]):
        apply(
            db,
            ingest_directly(
                db,
                [
                    {
                        "event_id": f"{customer}-{n}",
                        "customer_id": customer,
                        "event_name": "completion",
                        "metadata": {"tokens": tokens},
                    }
                ],
            ),
        )
    # 1500 tokens = 1.50 credits; 1501 -> 1.51 (a started hundredth is charged); 1509 -> 1.51; 1509.5 -> 1.51
    assert balance_of(db, customer, "tokens").balance == 1000 - 151
    assert entry_count(db, kind="deduction") == 2


def test_max_charges_only_increases_of_the_period_peak(db):
    customer = new_customer(db)
    post_entry(db, "seats", customer, "credit", "10")
    for n, seats in enumerate([3, 2, 5, 5]):
        apply(
            db,
            ingest_directly(
                db,
                [
                    {
                        "event_id": f"{customer}-{n}",
                        "customer_id": customer,
                        "event_name": "seats_reported",
                        "metadata": {"seats": seats},
                    }
                ],
            ),
        )
    assert balance_of(db, customer, "seats").balance == 5
    assert entry_count(db, kind="deduction") == 2


def test_last_follows_the_newest_timestamp_and_charges_its_high_water_mark(db):
    customer = new_customer(db)
    post_entry(db, "storage", customer, "credit", "100")
    now = utcnow()

    def report(name: str, gb: Any, minutes_ago: int) -> None:
        apply(
            db,
            ingest_directly(
                db,
                [
                    {
                        "event_id": f"{customer}-{name}",
                        "customer_id": customer,
                        "event_name": "storage_reported",
                        "metadata": {"gb": gb},
                        "timestamp": (now - timedelta(minutes=minutes_ago)).isoformat(),
                    }
                ],
            ),
        )

    report("a", 2.5, 30)  # 2.5 GB: 2.5 credits
    report("b", "1.0", 20)  # dropped to 1 GB: nothing charged, nothing refunded
    report("c", 3, 10)  # 3 GB: only the 0.5 above the high-water mark
    report("late", 9, 25)  # arrives late but is older than c: the last value stays 3
    assert balance_of(db, customer, "storage").balance == 1000 - 30
    with db.read() as session:
        from app.metering.models import MeterUsage

        usage = session.query(MeterUsage).filter_by(customer_id=customer).one()
        assert (usage.consumed, usage.charged, usage.event_count) == ("3", 30, 4)


def test_units_become_credits_rounded_up_at_the_precision():
    assert credits_for(Decimal(1), Decimal(1000), 0) == 1
    assert credits_for(Decimal(1000), Decimal(1000), 0) == 1
    assert credits_for(Decimal(1001), Decimal(1000), 0) == 2
    assert credits_for(Decimal("0.123"), Decimal(1), 2) == 13
    assert credits_for(Decimal(0), Decimal(7), 3) == 0


def test_usage_on_a_provider_managed_entitlement_is_refused(db):
    customer = new_customer(db)
    post_entry(db, "seats", customer, "credit", "10")
    with db.write() as session:
        session.get(CreditEntitlement, "seats").managed_by = "dodo"
    apply(
        db,
        ingest_directly(
            db,
            [
                {
                    "event_id": f"{customer}-m",
                    "customer_id": customer,
                    "event_name": "seats_reported",
                    "metadata": {"seats": 1},
                }
            ],
        ),
    )
    assert usage_event(db, f"{customer}-m").refusal_code == "provider_managed"
    with db.read() as session:
        assert session.query(Balance).filter_by(customer_id=customer).one().balance == 10


@pytest.mark.broker
def test_the_sweeper_enqueues_events_whose_doorbell_was_lost(db, worker):
    from conftest import JOBS

    from app.metering.service import sweep_usage_events

    customer = new_customer(db)
    post_entry(db, "seats", customer, "credit", "10")
    ids = ingest_directly(
        db,
        [
            {
                "event_id": f"{customer}-lost",
                "customer_id": customer,
                "event_name": "seats_reported",
                "metadata": {"seats": 4},
            }
        ],
    )  # never enqueued
    assert sweep_usage_events(db, JOBS.enqueue_usage, older_than=timedelta(0), now=utcnow() + timedelta(seconds=1)) == 1
    wait_for(lambda: usage_event(db, f"{customer}-lost").status == "applied", what="the swept event")
    assert balance_of(db, customer, "seats").balance == 6
    assert ids


def test_openapi_lists_the_metering_routes(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {
        "/events/ingest",
        "/subscriptions/{subscription_id}/usage-history",
        "/credit-entitlements/{credit_entitlement_id}/balances/{customer_id}/ledger-entries",
    } <= set(paths)
    assert json.dumps(paths)  # serialisable
