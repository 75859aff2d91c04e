"""Reading Stripe's JSON into provider-neutral snapshots.

Stripe renders `data.object` with the endpoint's API version: from 2025-03-31 the billing period lives
on subscription items and an invoice's subscription under `parent.subscription_details`; older
versions put them on the subscription and the invoice. Both are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.billing.subscriptions import SubscriptionSnapshot
from app.errors import PayloadError

SUBSCRIPTION_STATUSES = frozenset(
    {"incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused"}
)


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{where} must be an object")
    return value


def _id(value: Any, where: str) -> str:
    """An id that may be given as a string or as an expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{where} must be an id")
    return value


def _optional_id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _time(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{where} must be a unix timestamp")
    return datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True)
class PriceRef:
    price_id: str | None
    product_id: str | None
    lookup_key: str | None
    metadata: dict[str, Any]


def _price(price: Any) -> PriceRef:
    if isinstance(price, str):
        return PriceRef(price, None, None, {})
    if not isinstance(price, dict):
        return PriceRef(None, None, None, {})
    product = price.get("product")
    metadata = dict(price.get("metadata") or {})
    if isinstance(product, dict):  # an expanded product's metadata describes the plan too
        metadata = {**(product.get("metadata") or {}), **metadata}
    return PriceRef(_optional_id(price), _optional_id(product), price.get("lookup_key"), metadata)


def parse_subscription(obj: Any) -> tuple[SubscriptionSnapshot, PriceRef]:
    sub = _dict(obj, "data.object")
    if sub.get("object", "subscription") != "subscription":
        raise PayloadError("data.object is not a subscription")
    status = sub.get("status")
    if status not in SUBSCRIPTION_STATUSES:
        raise PayloadError(f"unknown subscription status {status!r}")
    items = _dict(sub.get("items") or {"data": []}, "items").get("data") or []
    item = _dict(items[0], "items.data[0]") if items else {}
    price = _price(item.get("price") or item.get("plan"))
    period_start = sub.get("current_period_start", item.get("current_period_start"))
    period_end = sub.get("current_period_end", item.get("current_period_end"))
    quantity = item.get("quantity") or 1
    snapshot = SubscriptionSnapshot(
        id=_id(sub.get("id"), "data.object.id"),
        provider="stripe",
        customer_id=_id(sub.get("customer"), "data.object.customer"),
        status=status,
        product_id=price.product_id,
        price_id=price.price_id,
        quantity=quantity if isinstance(quantity, int) else 1,
        period_start=_time(period_start, "current_period_start"),
        period_end=_time(period_end, "current_period_end"),
        cancel_at_period_end=bool(sub.get("cancel_at_period_end")),
        canceled_at=_time(sub.get("canceled_at"), "canceled_at"),
        ended_at=_time(sub.get("ended_at"), "ended_at"),
    )
    return snapshot, price


PREVIOUS_FIELDS = ("status", "cancel_at_period_end", "canceled_at", "current_period_start", "current_period_end")


def previous_state(previous_attributes: Any) -> dict[str, Any] | None:
    """The changed-from values of an `updated` event, in the normalised snapshot fields."""
    if not isinstance(previous_attributes, dict):
        return None
    previous = {key: previous_attributes[key] for key in PREVIOUS_FIELDS if key in previous_attributes}
    items = previous_attributes.get("items")
    if isinstance(items, dict) and items.get("data"):
        item = items["data"][0] if isinstance(items["data"][0], dict) else {}
        for key in ("current_period_start", "current_period_end"):
            if key in item and key not in previous:
                previous[key] = item[key]
        if isinstance(item.get("price"), dict) and item["price"].get("id"):
            previous["price_id"] = item["price"]["id"]
    return previous or None


@dataclass(frozen=True)
class PaidPeriod:
    """A subscription period an invoice paid for."""

    invoice_id: str
    customer_id: str
    subscription_id: str
    start: datetime
    end: datetime
    price: PriceRef


def parse_paid_invoice(obj: Any) -> PaidPeriod | None:
    """The subscription period a paid invoice covers, or None for a one-off invoice."""
    invoice = _dict(obj, "data.object")
    parent = invoice.get("parent") or {}
    subscription_id = _optional_id((parent.get("subscription_details") or {}).get("subscription")) or _optional_id(
        invoice.get("subscription")
    )
    if subscription_id is None:
        return None
    lines = _dict(invoice.get("lines") or {"data": []}, "lines").get("data") or []
    for line in lines:
        line = _dict(line, "lines.data[]")
        line_parent = line.get("parent") or {}
        is_subscription_line = (
            line.get("type") == "subscription" or line_parent.get("type") == "subscription_item_details"
        )
        period = line.get("period") or {}
        if not is_subscription_line or line.get("proration") or not period.get("start") or not period.get("end"):
            continue
        price_details = (line.get("pricing") or {}).get("price_details") or {}
        price = (
            _price(line.get("price"))
            if line.get("price")
            else PriceRef(
                _optional_id(price_details.get("price")), _optional_id(price_details.get("product")), None, {}
            )
        )
        return PaidPeriod(
            invoice_id=_id(invoice.get("id"), "data.object.id"),
            customer_id=_id(invoice.get("customer"), "data.object.customer"),
            subscription_id=subscription_id,
            start=_time(period["start"], "period.start"),  # type: ignore[arg-type]
            end=_time(period["end"], "period.end"),  # type: ignore[arg-type]
            price=price,
        )
    return None
