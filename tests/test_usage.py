"""GET /usage (seed 002): the seed's own example, every usage_status, and who may read what."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from conftest import JOBS, SERVICE_TOKEN, LiveServer

from app.billing.plans import open_plan_period
from app.billing.snapshots import Watermark
from app.billing.subscriptions import SubscriptionSnapshot, apply_subscription_snapshot, ensure_customer
from app.config import get_settings
from app.db import Database
from app.keys import create_key
from app.ledger.posting import Source
from app.ledger.service import deduct, lock_balance
from app.web import create_app

SEED_EXAMPLE = {
    "customer_id": "cus_abc123",
    "plan": "basic",
    "plan_ids": {"subscription_id": "sub_123", "price_id": "price_123", "product_id": "prod_123"},
    "status": "active",
    "usage_status": "approaching_limit",
    "cancel_at_period_end": False,
    "canceled_at": None,
    "unit": "request",
    "as_of": "2026-06-10T12:00:00Z",
    "period": {
        "start": "2026-06-01T00:00:00Z",
        "end": "2026-07-01T00:00:00Z",
        "days_remaining": 21,
        "elapsed_fraction": 0.3127,
    },
    "credits": {
        "included": 5000,
        "used": 4234,
        "remaining": 766,
        "overage": 0,
        "percent_used": 84.68,
        "projected_used": 13540,
        "hard_cap": 6000,
        "in_overage": False,
    },
}
JUNE = datetime(2026, 6, 1, tzinfo=UTC)
JULY = datetime(2026, 7, 1, tzinfo=UTC)


def subscribe(
    db: Database,
    customer: str,
    sub_id: str,
    *,
    status: str = "active",
    price: str = "price_123",
    product: str = "prod_123",
    start: datetime = JUNE,
    end: datetime = JULY,
    used: int = 0,
) -> None:
    """A customer on a catalogue plan with `used` credits consumed, written through the services."""
    settings = get_settings()
    plan = settings.catalogue.plan_for(price_id=price, product_id=product)
    assert plan is not None
    with db.write() as session:
        snapshot = SubscriptionSnapshot(
            id=sub_id,
            provider="stripe",
            customer_id=customer,
            status=status,
            product_id=product,
            price_id=price,
            quantity=1,
            period_start=start,
            period_end=end,
            cancel_at_period_end=False,
            canceled_at=None,
            ended_at=None,
            plan_key=plan.key,
        )
        assert apply_subscription_snapshot(session, snapshot, Watermark(at=1, rank=0, event_id=f"evt_{sub_id}"))
        open_plan_period(
            session,
            settings.catalogue,
            plan,
            customer_id=customer,
            subscription_id=sub_id,
            start=start,
            end=end,
            source=Source(),
        )
        if used:
            balance = lock_balance(session, customer, settings.catalogue.entitlement_for(plan).id)
            deduct(session, balance, used, source=Source(dedupe_key=f"usage:{sub_id}"), now=start)


def usage_at(db: Database, moment: datetime, **params: str) -> httpx.Response:
    app = create_app(get_settings(), db=db, clock=lambda: moment, jobs=JOBS, run_workers=False)
    with LiveServer(app) as live, httpx.Client(base_url=live.url) as client:
        return client.get("/usage", params=params, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"})


def test_the_seed_example_comes_out_field_for_field(db):
    subscribe(db, "cus_abc123", "sub_123", used=4234)
    # 9 d 9 h 8 min 38 s into a 30-day period is the seed's elapsed fraction, 0.3127.
    response = usage_at(db, datetime(2026, 6, 10, 9, 8, 38, tzinfo=UTC), customer_id="cus_abc123")
    assert response.status_code == 200
    document = response.json()
    assert document["as_of"] == "2026-06-10T09:08:38Z"
    assert {**document, "as_of": SEED_EXAMPLE["as_of"]} == SEED_EXAMPLE
    assert isinstance(document["credits"]["used"], int) and isinstance(document["credits"]["percent_used"], float)


@pytest.mark.parametrize(
    ("used", "usage_status", "overage", "in_overage"),
    [
        (100, "ok", 0, False),
        (4000, "approaching_limit", 0, False),
        (5100, "in_overage", 100, True),
        (6000, "limit_reached", 1000, True),
    ],
)
def test_usage_status_follows_the_period_usage(db, used, usage_status, overage, in_overage):
    subscribe(db, "cus_s", "sub_s", used=used)
    credits = usage_at(db, JUNE + timedelta(days=15), customer_id="cus_s").json()
    assert credits["usage_status"] == usage_status
    assert (credits["credits"]["overage"], credits["credits"]["in_overage"]) == (overage, in_overage)
    assert credits["credits"]["remaining"] == max(5000 - used, 0)
    assert credits["credits"]["projected_used"] == used * 2


def test_a_canceled_subscription_is_inactive(db):
    subscribe(db, "cus_c", "sub_c", status="canceled")
    document = usage_at(db, JUNE + timedelta(days=1), customer_id="cus_c").json()
    assert (document["status"], document["usage_status"]) == ("canceled", "inactive")


def test_projected_used_is_null_at_the_very_start_of_a_period(db):
    subscribe(db, "cus_p", "sub_p", used=10)
    assert usage_at(db, JUNE + timedelta(minutes=5), customer_id="cus_p").json()["credits"]["projected_used"] is None


def test_an_unlimited_plan_says_so(db):
    subscribe(db, "cus_u", "sub_u", price="price_pro_monthly", product="prod_pro", used=250_000)
    document = usage_at(db, JUNE + timedelta(days=3), customer_id="cus_u").json()
    assert document["credits"]["hard_cap"] == "unlimited"
    assert (document["plan"], document["unit"], document["usage_status"]) == ("pro", "token", "in_overage")


def test_a_customer_without_subscription_gets_status_none_and_zeroed_credits(db):
    with db.write() as session:
        ensure_customer(session, "cus_none", "stripe")
    response = usage_at(db, JUNE, customer_id="cus_none")
    assert response.status_code == 200
    document = response.json()
    assert (document["status"], document["usage_status"], document["period"]) == ("none", "inactive", None)
    assert document["credits"] == {
        "included": 0,
        "used": 0,
        "remaining": 0,
        "overage": 0,
        "percent_used": 0.0,
        "projected_used": None,
        "hard_cap": 0,
        "in_overage": False,
    }


def test_tokens_decide_who_may_read_what(db, http):
    subscribe(db, "cus_mine", "sub_mine", used=1)
    subscribe(db, "cus_theirs", "sub_theirs", used=2)
    mine = create_key(db, scope="customer", customer_id="cus_mine")

    def get(token: str | None, **params: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return http.get("/usage", params=params, headers=headers)

    assert get(None).status_code == 401
    assert get("not-a-token").status_code == 401
    assert get(mine).json()["customer_id"] == "cus_mine"
    assert get(mine, customer_id="cus_mine").status_code == 200
    forbidden = get(mine, customer_id="cus_theirs")
    assert (forbidden.status_code, forbidden.json()["code"]) == (403, "forbidden")
    assert get(SERVICE_TOKEN).status_code == 400  # a service token must say whom it asks about
    assert get(SERVICE_TOKEN, customer_id="cus_theirs").json()["credits"]["used"] == 2
    unknown = get(SERVICE_TOKEN, customer_id="cus_nobody")  # a new account: as one with no subscription
    assert unknown.status_code == 200
    document = unknown.json()
    assert (document["customer_id"], document["status"], document["usage_status"]) == ("cus_nobody", "none", "inactive")
    assert (document["plan"], document["period"], document["unit"]) == (None, None, None)
    assert document["credits"] == {
        "included": 0,
        "used": 0,
        "remaining": 0,
        "overage": 0,
        "percent_used": 0.0,
        "projected_used": None,
        "hard_cap": 0,
        "in_overage": False,
    }
