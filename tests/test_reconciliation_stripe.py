"""Reconciliation against the fake Stripe API, through the official SDK: lost webhooks repaired once."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fakes.stripe_api import StripeFake
from reconciliation_support import assert_verified, deliver, deliver_stripe, entry_count, recon_settings, run
from sqlalchemy import select

from app.billing.snapshots import Watermark
from app.billing.subscriptions import SubscriptionSnapshot, apply_subscription_snapshot
from app.db import get_database, utcnow
from app.ledger.service import find_entry
from app.models import Balance, Grant, InboxEvent, Subscription


@pytest.fixture(autouse=True)
def no_proxy_for_the_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def fake() -> Iterator[StripeFake]:
    with StripeFake() as stripe_fake:
        yield stripe_fake


def subscription(subscription_id: str) -> Subscription:
    with get_database().read() as session:
        row = session.get(Subscription, subscription_id)
        assert row is not None
        return row


def grants_of(subscription_id: str) -> list[str]:
    with get_database().read() as session:
        keys = session.execute(select(Grant.source_key).where(Grant.source_key.like(f"period:{subscription_id}:%")))
        return sorted(keys.scalars())


def test_a_missed_cancel_at_period_end_is_repaired_and_the_late_webhook_changes_nothing(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    sub = fake.create_subscription("cus_1", price="price_123")
    assert deliver_stripe(fake, fake.last_event()["id"]) == "processed"
    updated = fake.update_subscription(sub["id"], cancel_at_period_end=True)  # delivered, but lost on our side
    lost = fake.last_event()["id"]
    before = entry_count()

    report = run(settings, "stripe")

    assert report["status"] == "succeeded"
    assert report["counts"] == {"checked": 1, "matched": 0, "repaired": 1, "drifted": 1, "errors": 0}
    assert {(d["field"], d["tally_value"], d["provider_value"], d["action"]) for d in report["drifts"]} >= {
        ("cancel_at_period_end", "false", "true", "repaired")
    }
    row = subscription(sub["id"])
    assert row.cancel_at_period_end is True and row.canceled_at is not None
    assert row.watermark_event_id == f"reconcile:{report['id']}"
    assert entry_count() == before

    assert deliver_stripe(fake, lost) == "processed"  # the late webhook: applied as a no-op
    late = subscription(sub["id"])
    assert (late.cancel_at_period_end, late.watermark_event_id) == (True, f"reconcile:{report['id']}")
    assert entry_count() == before
    assert updated["cancel_at_period_end"] is True
    second = run(settings, "stripe")
    assert (second["counts"]["drifted"], second["counts"]["repaired"], second["drifts"]) == (0, 0, [])
    assert_verified()


def test_a_newer_webhook_still_wins_over_a_repair(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    sub = fake.create_subscription("cus_1", price="price_123")
    deliver_stripe(fake, fake.last_event()["id"])
    fake.update_subscription(sub["id"], cancel_at_period_end=True)
    report = run(settings, "stripe")
    newer = fake.update_subscription(sub["id"], cancel_at_period_end=False)
    event = json.loads(fake.event_json(fake.last_event()["id"]))
    event["created"] = int(utcnow().timestamp()) + 5  # Stripe sent it after the fetch
    deliver(get_database(), "stripe", event["id"], json.dumps(event))

    row = subscription(sub["id"])
    assert row.cancel_at_period_end is False and row.watermark_event_id == event["id"]
    assert newer["cancel_at_period_end"] is False and report["counts"]["repaired"] == 1


def test_a_missed_renewal_grants_the_period_once_and_the_late_webhooks_are_no_ops(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    sub = fake.create_subscription("cus_1", price="price_123")
    deliver_stripe(fake, fake.last_event()["id"])
    renewed = fake.renew_subscription(sub["id"])  # customer.subscription.updated + invoice.paid, both lost
    lost = [event_id for event_id, event in fake.events.items() if event.created == renewed["created"] or True][-2:]

    report = run(settings, "stripe")

    start = renewed["items"]["data"][0]["current_period_start"]
    assert report["counts"]["repaired"] == 1
    assert len(grants_of(sub["id"])) == 2
    assert ("current_period_start", "repaired") in {(d["field"], d["action"]) for d in report["drifts"]}
    with get_database().read() as session:
        balance = session.execute(select(Balance).where(Balance.customer_id == "cus_1")).scalar_one()
        assert balance.balance == 5000 and int(balance.period_start.timestamp()) == start  # type: ignore[union-attr]
    before = entry_count()
    for event_id in lost:
        deliver_stripe(fake, event_id)
    assert entry_count() == before and len(grants_of(sub["id"])) == 2
    second = run(settings, "stripe")
    assert second["counts"]["drifted"] == 0
    assert_verified()


def test_a_subscription_whose_every_webhook_was_lost_is_created_and_granted_once(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    sub = fake.create_subscription("cus_lost", price="price_123")  # Stripe delivered; Tally never got it
    created_event = fake.last_event()["id"]

    report = run(settings, "stripe")

    assert report["counts"] == {"checked": 1, "matched": 0, "repaired": 1, "drifted": 1, "errors": 0}
    drifts = {(d["field"], d["action"]) for d in report["drifts"]}
    assert drifts == {("exists", "created"), ("period_grant", "granted")}
    assert subscription(sub["id"]).status == "active" and len(grants_of(sub["id"])) == 1
    before = entry_count()
    deliver_stripe(fake, created_event)
    assert entry_count() == before
    assert run(settings, "stripe")["counts"]["drifted"] == 0
    assert_verified()


def test_undelivered_events_go_through_the_inbox(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    sub = fake.create_subscription("cus_1", price="price_123", delivered=False)
    event_id = fake.last_event()["id"]

    report = run(settings, "stripe")

    assert ("event", event_id, "ingested") in {
        (d["object_type"], d["object_id"], d["action"]) for d in report["drifts"]
    }
    with get_database().read() as session:
        stored = session.execute(select(InboxEvent).where(InboxEvent.provider_event_id == event_id)).scalar_one()
        assert stored.status == "processed"
    assert subscription(sub["id"]).status == "active" and len(grants_of(sub["id"])) == 1
    second = run(settings, "stripe")  # the event is still undelivered at Stripe: found again, already stored
    assert second["counts"]["drifted"] == 0 and second["counts"]["matched"] == 2
    assert_verified()


def test_dry_run_changes_nothing_but_records_what_it_would_do(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    fake.create_subscription("cus_1", price="price_123")

    report = run(settings, "stripe", dry_run=True)

    assert report["dry_run"] is True and report["counts"]["drifted"] == 1 and report["counts"]["repaired"] == 0
    assert {d["action"] for d in report["drifts"]} == {"would repair", "would grant"}
    assert entry_count() == 0
    with get_database().read() as session:
        assert session.execute(select(Subscription)).first() is None


def test_thin_events_for_tracked_objects_are_resolved_the_rest_stay_skipped(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    sub = fake.create_subscription("cus_1", price="price_123")
    deliver_stripe(fake, fake.last_event()["id"])
    fake.update_subscription(sub["id"], cancel_at_period_end=True, event=False)
    url = f"/v1/subscriptions/{sub['id']}"
    tracked = fake.add_thin_event("v1.subscription.updated", {"id": sub["id"], "type": "subscription", "url": url})
    meter = fake.add_thin_event(
        "v1.billing.meter.error_report_triggered",
        {"id": "mtr_1", "type": "billing.meter", "url": "/v1/billing/meters/mtr_1"},
    )
    for thin in (tracked, meter):
        assert (
            deliver(get_database(), "stripe", thin["id"], json.dumps(fake.thin_notification(thin["id"]))) == "skipped"
        )

    report = run(settings, "stripe")

    assert fake.calls_to(url) == 1
    assert subscription(sub["id"]).cancel_at_period_end is True
    with get_database().read() as session:
        events = {e.provider_event_id: e for e in session.execute(select(InboxEvent)).scalars()}
    assert events[tracked["id"]].status == "processed"
    assert events[meter["id"]].status == "skipped"
    assert "does not track billing.meter" in (events[meter["id"]].last_error or "")
    assert report["counts"]["repaired"] == 1
    assert run(settings, "stripe")["counts"]["drifted"] == 0
    assert_verified()


def test_more_than_a_hundred_subscriptions_page_and_unknown_ones_are_reported(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    ids = fake.seed_subscriptions(150, price="price_123")
    with get_database().write() as session:
        apply_subscription_snapshot(
            session,
            SubscriptionSnapshot(
                "sub_gone", "stripe", "cus_gone", "active", None, None, 1, None, None, False, None, None
            ),
            Watermark(1, 0, "evt_gone"),
        )

    report = run(settings, "stripe")

    assert fake.calls_to("/v1/subscriptions") == 2
    assert report["counts"]["checked"] == 151 and report["counts"]["repaired"] == 150
    assert ("sub_gone", "exists", "active", "missing", "reported") in {
        (d["object_id"], d["field"], d["tally_value"], d["provider_value"], d["action"]) for d in report["drifts"]
    }
    with get_database().read() as session:
        assert session.execute(select(Subscription).where(Subscription.id.in_(ids))).scalars().all().__len__() == 150
        assert session.get(Subscription, "sub_gone") is not None  # reported, never deleted
        assert find_entry(session, f"grant:period:{ids[0]}:{subscription(ids[0]).current_period_start.isoformat()}")  # type: ignore[union-attr]
    second = run(settings, "stripe")
    assert second["counts"]["repaired"] == 0 and second["counts"]["drifted"] == 1  # sub_gone, reported again
    assert second["api_calls"] <= 3
    assert_verified()
