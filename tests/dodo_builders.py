"""Dodo Payments payloads as Dodo sends them, Standard Webhooks signing, and a server configured for Dodo.

The session's shared server has no Dodo key; `dodo_server` is the same app with
`DODO_PAYMENTS_WEBHOOK_KEY`-equivalent settings (two keys, as during a rotation).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
from conftest import DODO_KEY, DODO_OLD_KEY  # noqa: F401  (re-exported for the Dodo tests)
from standardwebhooks import Webhook

from app.config import get_settings
from app.db import Database
from app.inbox.processing import apply_event
from app.inbox.store import store_event
from app.models import InboxEvent

EVENT_TYPES = {
    "credit_added": "credit.added",
    "credit_deducted": "credit.deducted",
    "credit_expired": "credit.expired",
    "credit_rolled_over": "credit.rolled_over",
    "rollover_forfeited": "credit.rollover_forfeited",
    "overage_charged": "credit.overage_charged",
    "overage_reset": "credit.overage_reset",
    "manual_adjustment": "credit.manual_adjustment",
}


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def envelope(event_type: str, data: dict[str, Any], *, timestamp: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"business_id": "bus_test", "type": event_type, "timestamp": timestamp, "data": data}


def ledger_entry(
    entry_id: str,
    customer: str,
    entitlement: str,
    transaction_type: str,
    amount: str | Decimal,
    before: tuple[str | Decimal, str | Decimal],
    after: tuple[str | Decimal, str | Decimal],
    created_at: str,
    *,
    is_credit: bool | None = None,
    grant_id: str | None = None,
) -> dict[str, Any]:
    """A `credit.*` event carrying one Dodo ledger entry."""
    credit = transaction_type in {"credit_added", "credit_rolled_over", "overage_reset", "auto_top_up", "refund"}
    data = {
        "id": entry_id,
        "customer_id": customer,
        "credit_entitlement_id": entitlement,
        "grant_id": grant_id,
        "transaction_type": transaction_type,
        "amount": str(amount),
        "is_credit": credit if is_credit is None else is_credit,
        "balance_before": str(before[0]),
        "balance_after": str(after[0]),
        "overage_before": str(before[1]),
        "overage_after": str(after[1]),
        "description": None,
        "reference_type": None,
        "reference_id": None,
        "metadata": {},
        "brand_id": "bra_test",
        "business_id": "bus_test",
        "created_at": created_at,
    }
    return envelope(EVENT_TYPES[transaction_type], data)


def cart_line(
    entitlement: str,
    *,
    name: str = "API Calls",
    unit: str = "calls",
    credits_amount: str = "1000.00",
    overage_enabled: bool = True,
    overage_limit: str | None = "100.00",
) -> dict[str, Any]:
    return {
        "credit_entitlement_id": entitlement,
        "credit_entitlement_name": name,
        "unit": unit,
        "credits_amount": credits_amount,
        "overage_enabled": overage_enabled,
        "overage_limit": overage_limit,
        "overage_behavior": "invoice_at_billing",
        "rollover_enabled": False,
        "product_id": "pdt_test",
        "remaining_balance": credits_amount,
        "overage_balance": "0",
        "expires_after_days": None,
        "low_balance_threshold_percent": 20,
        "max_rollover_count": None,
        "rollover_percentage": None,
        "rollover_timeframe_count": None,
        "rollover_timeframe_interval": None,
    }


def subscription(
    sub_id: str,
    customer: str,
    status: str = "active",
    *,
    start: str = "2026-01-01T00:00:00Z",
    end: str = "2026-02-01T00:00:00Z",
    cart: list[dict[str, Any]] | None = None,
    cancel_at_next_billing_date: bool = False,
    cancelled_at: str | None = None,
    event_type: str | None = None,
) -> dict[str, Any]:
    data = {
        "payload_type": "Subscription",
        "subscription_id": sub_id,
        "status": status,
        "product_id": "pdt_test",
        "quantity": 1,
        "customer": {"customer_id": customer, "email": f"{customer}@example.com", "name": "Ada"},
        "previous_billing_date": start,
        "next_billing_date": end,
        "cancel_at_next_billing_date": cancel_at_next_billing_date,
        "cancelled_at": cancelled_at,
        "meters": [
            {
                "meter_id": "mtr_calls",
                "name": "API calls",
                "currency": "USD",
                "free_threshold": 100,
                "measurement_unit": "call",
                "price_per_unit": "0.01",
                "description": None,
            }
        ],
        "credit_entitlement_cart": cart if cart is not None else [cart_line("cde_calls")],
        "meter_credit_entitlement_cart": [
            {
                "credit_entitlement_id": "cde_calls",
                "meter_id": "mtr_calls",
                "meter_name": "API calls",
                "meter_units_per_credit": "1",
                "product_id": "pdt_test",
            }
        ],
        "addons": [],
        "metadata": {},
        "currency": "USD",
        "recurring_pre_tax_amount": 1000,
        "created_at": start,
        "on_demand": False,
        "payment_frequency_count": 1,
        "payment_frequency_interval": "Month",
        "subscription_period_count": 1,
        "subscription_period_interval": "Month",
        "tax_inclusive": False,
        "trial_period_days": 0,
    }
    return envelope(event_type or f"subscription.{status}", data)


def sign(body: str, webhook_id: str, *, key: str = DODO_KEY, timestamp: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers for `body`, signed now (or at `timestamp`)."""
    signed_at = int(time.time()) if timestamp is None else timestamp
    signature = Webhook(key).sign(webhook_id, datetime.fromtimestamp(signed_at, UTC), body)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(signed_at),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def deliver(http: httpx.Client, payload: dict[str, Any], webhook_id: str, *, key: str = DODO_KEY) -> httpx.Response:
    body = json.dumps(payload)
    return http.post("/webhooks/dodo", content=body, headers=sign(body, webhook_id, key=key))


def apply_now(db: Database, payload: dict[str, Any], webhook_id: str, *, received_later: int = 0) -> str:
    """Store and apply one event synchronously, as a worker would; its status, or "duplicate".

    `received_later` moves the inbox receipt time forward, as if the delivery had come that many
    seconds later (tests cannot wait for the clock).
    """
    inbox_id = store_event(
        db, provider="dodo", event_id=webhook_id, event_type=payload["type"], body=json.dumps(payload)
    )
    if inbox_id is None:
        return "duplicate"
    if received_later:
        with db.write() as session:
            event = session.get(InboxEvent, inbox_id)
            assert event is not None
            event.received_at = event.received_at + timedelta(seconds=received_later)
    return apply_event(db, get_settings().catalogue, inbox_id, max_attempts=1)
