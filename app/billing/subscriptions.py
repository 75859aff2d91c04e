"""Customers and subscriptions as the providers last described them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.billing.snapshots import SnapshotState, Watermark, is_newer
from app.db import insert_ignoring_conflicts
from app.models import Customer, Subscription

LIVE_STATUSES = frozenset({"active", "trialing", "past_due"})
"""Statuses in which a subscription still entitles its customer to credits."""


def _epoch(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


@dataclass(frozen=True)
class SubscriptionSnapshot:
    id: str
    provider: str
    customer_id: str
    status: str
    product_id: str | None
    price_id: str | None
    quantity: int
    period_start: datetime | None
    period_end: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    ended_at: datetime | None
    plan_key: str | None = None

    @property
    def state(self) -> SnapshotState:
        return SnapshotState(
            {
                "status": self.status,
                "price_id": self.price_id,
                "cancel_at_period_end": self.cancel_at_period_end,
                "canceled_at": _epoch(self.canceled_at),
                "current_period_start": _epoch(self.period_start),
                "current_period_end": _epoch(self.period_end),
            }
        )


def stored_state(row: Subscription) -> SnapshotState:
    return SnapshotState(
        {
            "status": row.status,
            "price_id": row.price_id,
            "cancel_at_period_end": row.cancel_at_period_end,
            "canceled_at": _epoch(row.canceled_at),
            "current_period_start": _epoch(row.current_period_start),
            "current_period_end": _epoch(row.current_period_end),
        }
    )


def ensure_customer(session: Session, customer_id: str, provider: str) -> None:
    """The customer row exists (a read first: within a batch the identity map answers without SQL)."""
    if session.get(Customer, customer_id) is None:
        insert_ignoring_conflicts(session, Customer, {"id": customer_id, "provider": provider})


def apply_customer_snapshot(
    session: Session,
    *,
    customer_id: str,
    provider: str,
    watermark: Watermark,
    email: str | None,
    name: str | None,
    deleted: bool,
    deleted_at: datetime | None = None,
) -> bool:
    """Record a customer's newest known state; an older snapshot changes nothing."""
    ensure_customer(session, customer_id, provider)
    row = session.execute(
        select(Customer).where(Customer.id == customer_id).with_for_update().execution_options(populate_existing=True)
    ).scalar_one()
    stored = (
        None
        if row.watermark_event_id is None
        else Watermark(row.watermark_at, row.watermark_rank, row.watermark_event_id)
    )
    stored_fields = SnapshotState({"status": "canceled" if row.deleted_at else "active"})
    incoming_fields = SnapshotState({"status": "canceled" if deleted else "active"})
    if not is_newer(watermark, incoming_fields, stored, stored_fields):
        return False
    row.email, row.name = email, name
    row.deleted_at = (deleted_at or row.deleted_at) if deleted else None
    row.watermark_at, row.watermark_rank, row.watermark_event_id = watermark.at, watermark.rank, watermark.event_id
    return True


def apply_subscription_snapshot(session: Session, snapshot: SubscriptionSnapshot, watermark: Watermark) -> bool:
    """Store the snapshot if it is newer than what we have; True when it was applied."""
    ensure_customer(session, snapshot.customer_id, snapshot.provider)
    locking = (
        select(Subscription)
        .where(Subscription.id == snapshot.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    row = session.execute(locking).scalar_one_or_none()
    if row is None:  # a new subscription: the unique key absorbs a concurrent first sight
        values = {"id": snapshot.id, "provider": snapshot.provider, "customer_id": snapshot.customer_id}
        insert_ignoring_conflicts(session, Subscription, {**values, "status": snapshot.status})
        row = session.execute(locking).scalar_one()
    stored = (
        None
        if row.watermark_event_id is None
        else Watermark(row.watermark_at, row.watermark_rank, row.watermark_event_id, row.watermark_previous)
    )
    if not is_newer(watermark, snapshot.state, stored, stored_state(row)):
        return False
    row.customer_id, row.status = snapshot.customer_id, snapshot.status
    row.product_id, row.price_id, row.quantity = snapshot.product_id, snapshot.price_id, snapshot.quantity
    row.plan_key = snapshot.plan_key
    row.current_period_start, row.current_period_end = snapshot.period_start, snapshot.period_end
    row.cancel_at_period_end, row.canceled_at, row.ended_at = (
        snapshot.cancel_at_period_end,
        snapshot.canceled_at,
        snapshot.ended_at,
    )
    row.watermark_at, row.watermark_rank = watermark.at, watermark.rank
    row.watermark_event_id, row.watermark_previous = watermark.event_id, watermark.previous
    return True


def current_subscription(session: Session, customer_id: str) -> Subscription | None:
    """The subscription that speaks for a customer: the newest live one, else the newest of any."""
    rows = (
        session.execute(
            select(Subscription)
            .where(Subscription.customer_id == customer_id)
            .order_by(Subscription.current_period_start.desc().nulls_last(), Subscription.created_at.desc())
        )
        .scalars()
        .all()
    )
    live = [row for row in rows if row.status in LIVE_STATUSES]
    candidates = live or rows
    return candidates[0] if candidates else None
