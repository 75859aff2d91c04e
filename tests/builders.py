"""Stripe payloads as Stripe renders them, and signed deliveries over real HTTP."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import stripe
from conftest import STRIPE_SECRET


def subscription_object(
    sub_id: str,
    customer: str,
    status: str,
    start: int,
    end: int,
    *,
    price: str = "price_123",
    product: str = "prod_123",
    cancel_at_period_end: bool = False,
    canceled_at: int | None = None,
    api: str = "2025-03-31",
) -> dict[str, Any]:
    """A subscription; from API 2025-03-31 the period sits on the item, before it on the subscription."""
    item: dict[str, Any] = {
        "id": f"si_{sub_id}",
        "object": "subscription_item",
        "quantity": 1,
        "price": {"id": price, "object": "price", "product": product, "lookup_key": None, "metadata": {}},
    }
    sub: dict[str, Any] = {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": canceled_at,
        "ended_at": None,
        "items": {"object": "list", "data": [item]},
    }
    period = {"current_period_start": start, "current_period_end": end}
    (item if api >= "2025-03-31" else sub).update(period)
    return sub


def event(
    event_id: str,
    event_type: str,
    obj: dict[str, Any],
    *,
    created: int | None = None,
    previous_attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "type": event_type,
        "created": created if created is not None else int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "data": data,
    }


def invoice_paid(
    event_id: str,
    sub_id: str,
    customer: str,
    start: int,
    end: int,
    *,
    price: str = "price_123",
    created: int | None = None,
    api: str = "2025-03-31",
) -> dict[str, Any]:
    line: dict[str, Any] = {"id": f"il_{event_id}", "object": "line_item", "period": {"start": start, "end": end}}
    invoice: dict[str, Any] = {
        "id": f"in_{event_id}",
        "object": "invoice",
        "customer": customer,
        "status": "paid",
        "billing_reason": "subscription_cycle",
        "lines": {"object": "list", "data": [line]},
    }
    if api >= "2025-03-31":
        invoice["parent"] = {"type": "subscription_details", "subscription_details": {"subscription": sub_id}}
        line["parent"] = {
            "type": "subscription_item_details",
            "subscription_item_details": {"subscription": sub_id, "proration": False},
        }
        line["pricing"] = {"type": "price_details", "price_details": {"price": price, "product": "prod_123"}}
    else:
        invoice["subscription"] = sub_id
        line.update({"type": "subscription", "proration": False, "price": {"id": price, "product": "prod_123"}})
    return event(event_id, "invoice.paid", invoice, created=created)


def sign(body: str, secret: str = STRIPE_SECRET, timestamp: int | None = None) -> str:
    return stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp)


def deliver(http: httpx.Client, payload: dict[str, Any], *, secret: str = STRIPE_SECRET) -> httpx.Response:
    body = json.dumps(payload)
    return http.post(
        "/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": sign(body, secret), "Content-Type": "application/json"},
    )
