"""Dodo events end to end: real HTTP into the inbox, real workers, one effect per delivery however
often and however concurrently it arrives; subscription snapshots and carts, alerts, payments."""

from __future__ import annotations

import threading

import pytest
from conftest import wait_for
from dodo_builders import apply_now, cart_line, deliver, envelope, ledger_entry, subscription
from sqlalchemy import func, select

from app.models import (
    Balance,
    CreditAlert,
    CreditEntitlement,
    Customer,
    InboxEvent,
    LedgerEntry,
    ProviderPayment,
    Subscription,
    SubscriptionCredit,
    SubscriptionMeter,
    SubscriptionMeterCredit,
)


def statuses(db) -> dict[str, str]:
    with db.read() as session:
        return dict(session.execute(select(InboxEvent.provider_event_id, InboxEvent.status)).all())


@pytest.mark.broker
def test_twenty_parallel_deliveries_of_one_event_have_one_effect(db, dodo_http, worker):
    payload = ledger_entry(
        "cle_par", "cus_par", "cde_calls", "credit_added", "250.00", ("0", "0"), ("250.00", "0"), "2026-03-01T00:00:00Z"
    )
    results: list[int] = []
    duplicates: list[bool] = []
    barrier = threading.Barrier(20)

    def send() -> None:
        barrier.wait()
        response = deliver(dodo_http, payload, "msg_parallel")
        results.append(response.status_code)
        duplicates.append(response.json()["duplicate"])

    threads = [threading.Thread(target=send) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 20
    assert sorted(duplicates) == [False] + [True] * 19
    wait_for(lambda: statuses(db) == {"msg_parallel": "processed"}, what="the event to be applied")
    with db.read() as session:
        assert session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one() == 1
        balance = session.execute(select(Balance).where(Balance.customer_id == "cus_par")).scalar_one()
        assert balance.balance == 250 * 10**10


@pytest.mark.broker
def test_parallel_deliveries_of_one_ledger_entry_under_different_webhook_ids(db, dodo_http, worker):
    payload = ledger_entry(
        "cle_par2", "cus_par2", "cde_calls", "credit_added", "5", ("0", "0"), ("5", "0"), "2026-03-01T00:00:00Z"
    )
    threads = [threading.Thread(target=deliver, args=(dodo_http, payload, f"msg_p2_{index}")) for index in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: set(statuses(db).values()) == {"processed"} and len(statuses(db)) == 10, what="all applied")
    with db.read() as session:
        assert session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one() == 1
        assert session.execute(select(Balance.entry_count)).scalar_one() == 1


@pytest.mark.broker
def test_a_subscription_stores_its_period_cart_and_meters(db, dodo_http, worker):
    cart = [
        cart_line("cde_calls", name="API Calls", unit="calls", overage_limit="100.00"),
        cart_line(
            "cde_tokens", name="Tokens", unit="tokens", credits_amount="5000", overage_enabled=False, overage_limit=None
        ),
    ]
    response = deliver(
        dodo_http, subscription("sub_cart", "cus_cart", cart=cart, cancel_at_next_billing_date=True), "msg_cart"
    )
    assert response.status_code == 200
    wait_for(lambda: statuses(db) == {"msg_cart": "processed"}, what="the subscription to be applied")
    with db.read() as session:
        sub = session.get(Subscription, "sub_cart")
        assert (sub.provider, sub.status, sub.customer_id, sub.product_id) == ("dodo", "active", "cus_cart", "pdt_test")
        assert sub.current_period_start.isoformat() == "2026-01-01T00:00:00+00:00"
        assert sub.current_period_end.isoformat() == "2026-02-01T00:00:00+00:00"
        assert sub.cancel_at_period_end is True
        assert session.get(Customer, "cus_cart").email == "cus_cart@example.com"
        calls = session.get(CreditEntitlement, "cde_calls")
        assert (calls.managed_by, calls.name, calls.unit, calls.precision) == ("dodo", "API Calls", "calls", 10)
        assert (calls.overage_enabled, calls.overage_limit) == (True, 100 * 10**10)
        tokens = session.get(CreditEntitlement, "cde_tokens")
        assert (tokens.managed_by, tokens.overage_enabled, tokens.overage_limit) == ("dodo", False, None)
        lines = session.execute(select(SubscriptionCredit).order_by(SubscriptionCredit.entitlement_id)).scalars().all()
        assert [(line.entitlement_id, line.credits_amount, line.overage_limit) for line in lines] == [
            ("cde_calls", 1000 * 10**10, 100 * 10**10),
            ("cde_tokens", 5000 * 10**10, None),
        ]
        meter = session.execute(select(SubscriptionMeter)).scalar_one()
        assert (meter.meter_id, meter.free_threshold, meter.price_per_unit) == ("mtr_calls", 100, "0.01")
        link = session.execute(select(SubscriptionMeterCredit)).scalar_one()
        assert (link.meter_id, link.entitlement_id, link.meter_units_per_credit) == ("mtr_calls", "cde_calls", "1")
        balance = session.execute(select(Balance).where(Balance.entitlement_id == "cde_calls")).scalar_one()
        assert (balance.overage_enabled, balance.overage_limit, balance.balance) == (True, 100 * 10**10, 0)


def _store_then_apply(db, payload: dict, webhook_id: str, later: int) -> str:
    return apply_now(db, payload, webhook_id, received_later=later)


def test_a_later_period_wins_whatever_the_arrival_order(db):
    renewed = subscription(
        "sub_order",
        "cus_order",
        start="2026-02-01T00:00:00Z",
        end="2026-03-01T00:00:00Z",
        event_type="subscription.renewed",
    )
    first = subscription("sub_order", "cus_order", start="2026-01-01T00:00:00Z", end="2026-02-01T00:00:00Z")
    assert _store_then_apply(db, renewed, "msg_o1", 0) == "processed"
    assert _store_then_apply(db, first, "msg_o2", 10) == "processed"  # received later, but an older period
    with db.read() as session:
        assert session.get(Subscription, "sub_order").current_period_start.month == 2


def test_within_a_period_the_later_receipt_wins_but_a_terminal_status_is_final(db):
    on_hold = subscription("sub_life", "cus_life", status="on_hold")
    active = subscription("sub_life", "cus_life", status="active")
    cancelled = subscription("sub_life", "cus_life", status="cancelled", cancelled_at="2026-01-15T00:00:00Z")
    assert _store_then_apply(db, on_hold, "msg_l1", 0) == "processed"
    assert _store_then_apply(db, active, "msg_l2", 5) == "processed"
    with db.read() as session:
        assert session.get(Subscription, "sub_life").status == "active"
    assert _store_then_apply(db, cancelled, "msg_l3", 10) == "processed"
    assert _store_then_apply(db, active, "msg_l4", 20) == "processed"  # a stale delivery after the cancel
    with db.read() as session:
        sub = session.get(Subscription, "sub_life")
        assert (sub.status, sub.canceled_at.day) == ("cancelled", 15)


def test_an_older_snapshot_does_not_replace_the_newer_cart(db):
    new = subscription("sub_cart2", "cus_cart2", cart=[cart_line("cde_calls", overage_limit="50")])
    old = subscription("sub_cart2", "cus_cart2", cart=[cart_line("cde_calls", overage_limit="10")])
    assert _store_then_apply(db, new, "msg_c1", 10) == "processed"
    assert _store_then_apply(db, old, "msg_c2", 0) == "processed"
    with db.read() as session:
        assert session.execute(select(SubscriptionCredit.overage_limit)).scalar_one() == 50 * 10**10


def test_balance_low_is_kept_as_an_alert(db):
    payload = envelope(
        "credit.balance_low",
        {
            "customer_id": "cus_low",
            "subscription_id": "sub_low",
            "credit_entitlement_id": "cde_calls",
            "credit_entitlement_name": "API Calls",
            "available_balance": "12.50",
            "subscription_credits_amount": "100",
            "threshold_percent": 20,
            "threshold_amount": "20",
            "brand_id": "bra_test",
        },
    )
    assert apply_now(db, payload, "msg_low") == "processed"
    assert apply_now(db, payload, "msg_low") == "duplicate"
    with db.read() as session:
        alert = session.execute(select(CreditAlert)).scalar_one()
        assert (alert.customer_id, alert.available_balance, alert.threshold_percent) == ("cus_low", "12.50", 20)


def test_payments_and_refunds_are_stored_with_their_latest_state(db):
    payment = {
        "payment_id": "pay_1",
        "status": "processing",
        "total_amount": 1999,
        "currency": "USD",
        "customer": {"customer_id": "cus_pay", "email": "a@b.c", "name": "A"},
        "subscription_id": "sub_pay",
        "created_at": "2026-01-01T00:00:00Z",
    }
    assert (
        _store_then_apply(db, envelope("payment.succeeded", {**payment, "status": "succeeded"}), "msg_pay2", 10)
        == "processed"
    )
    assert _store_then_apply(db, envelope("payment.processing", payment), "msg_pay1", 0) == "processed"
    refund = {
        "refund_id": "ref_1",
        "payment_id": "pay_1",
        "status": "succeeded",
        "amount": 500,
        "currency": "USD",
        "customer": {"customer_id": "cus_pay"},
        "created_at": "2026-01-02T00:00:00Z",
        "is_partial": True,
    }
    assert apply_now(db, envelope("refund.succeeded", refund), "msg_ref") == "processed"
    with db.read() as session:
        rows = {row.object_id: row for row in session.execute(select(ProviderPayment)).scalars()}
        assert (rows["pay_1"].status, rows["pay_1"].amount, rows["pay_1"].kind) == ("succeeded", 1999, "payment")
        assert (rows["ref_1"].payment_id, rows["ref_1"].amount, rows["ref_1"].kind) == ("pay_1", 500, "refund")


@pytest.mark.broker
def test_unknown_types_are_kept_and_malformed_payloads_dead_lettered(db, dodo_http, worker):
    assert deliver(dodo_http, envelope("license_key.created", {"id": "lic_1"}), "msg_unknown").status_code == 200
    broken = ledger_entry(
        "cle_broken", "cus_broken", "cde_calls", "credit_added", "5", ("0", "0"), ("5", "0"), "2026-03-01T00:00:00Z"
    )
    del broken["data"]["balance_after"]
    assert deliver(dodo_http, broken, "msg_broken").status_code == 200
    wait_for(lambda: statuses(db) == {"msg_unknown": "skipped", "msg_broken": "failed"}, what="both settled")
    with db.read() as session:
        error = session.execute(select(InboxEvent.last_error).where(InboxEvent.provider_event_id == "msg_broken"))
        assert "balance_after" in error.scalar_one()
        assert session.execute(select(LedgerEntry)).first() is None


def test_a_negative_balance_from_the_provider_is_refused(db):
    payload = ledger_entry(
        "cle_neg", "cus_neg", "cde_calls", "credit_deducted", "5", ("0", "0"), ("-5", "0"), "2026-03-01T00:00:00Z"
    )
    assert apply_now(db, payload, "msg_neg") == "failed"
