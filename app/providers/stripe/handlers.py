"""Applying Stripe events: subscription and customer snapshots, and period credit grants."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy.orm import Session

from app.billing.plans import open_plan_period
from app.billing.snapshots import Watermark
from app.billing.subscriptions import (
    SubscriptionSnapshot,
    apply_customer_snapshot,
    apply_subscription_snapshot,
    ensure_customer,
)
from app.catalogue import PlanSpec
from app.ledger.posting import Source
from app.models import InboxEvent, Subscription
from app.providers.base import HandlerContext
from app.providers.stripe.objects import (
    EventInfo,
    PriceRef,
    event_type,
    parse_customer_event,
    parse_paid_invoice,
    parse_subscription_event,
)

GRANTING_STATUSES = frozenset({"active", "trialing"})

# Order of event types that can share one second: creation first, deletion last.
LIFECYCLE_RANK = {
    "customer.subscription.created": 0,
    "customer.subscription.updated": 1,
    "customer.subscription.paused": 1,
    "customer.subscription.resumed": 1,
    "customer.subscription.trial_will_end": 1,
    "customer.subscription.deleted": 2,
    "customer.created": 0,
    "customer.updated": 1,
    "customer.deleted": 2,
}


def _watermark(info: EventInfo) -> Watermark:
    return Watermark(at=info.created, rank=LIFECYCLE_RANK.get(info.type, 1), event_id=info.id, previous=info.previous)


def resolve_plan(context: HandlerContext, price: PriceRef) -> PlanSpec | None:
    return context.catalogue.plan_for(
        price_id=price.price_id, product_id=price.product_id, lookup_key=price.lookup_key, metadata=price.metadata
    )


def apply_subscription(
    session: Session,
    snapshot: SubscriptionSnapshot,
    price: PriceRef,
    watermark: Watermark,
    context: HandlerContext,
    source: Source,
) -> bool:
    """Store a subscription snapshot if it is newer, and grant its period once; True when it was applied.

    The one path for webhooks and reconciliation alike (reconciliation passes a watermark "as of the fetch").
    """
    plan = resolve_plan(context, price)
    snapshot = replace(snapshot, plan_key=plan.key if plan else None)
    if not apply_subscription_snapshot(session, snapshot, watermark):
        return False
    if (
        plan is not None
        and snapshot.status in GRANTING_STATUSES
        and snapshot.period_start is not None
        and snapshot.period_end is not None
        and snapshot.period_end > context.now
    ):
        open_plan_period(
            session,
            context.catalogue,
            plan,
            customer_id=snapshot.customer_id,
            subscription_id=snapshot.id,
            start=snapshot.period_start,
            end=snapshot.period_end,
            source=source,
        )
    return True


def _on_subscription(session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> None:
    parsed = parse_subscription_event(payload)
    apply_subscription(
        session, parsed.snapshot, parsed.price, _watermark(parsed.info), context, Source(inbox_event_id=event.id)
    )


def _on_invoice_paid(session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> None:
    period = parse_paid_invoice(payload)
    if period is None or period.end <= context.now:
        return  # a one-off invoice, or a period already over: nothing left to grant
    plan = resolve_plan(context, period.price)
    if plan is None:
        known = session.get(Subscription, period.subscription_id)
        plan = context.catalogue.plans.get(known.plan_key) if known and known.plan_key else None
    if plan is None:
        return
    ensure_customer(session, period.customer_id, "stripe")
    open_plan_period(
        session,
        context.catalogue,
        plan,
        customer_id=period.customer_id,
        subscription_id=period.subscription_id,
        start=period.start,
        end=period.end,
        source=Source(inbox_event_id=event.id, description=f"invoice {period.invoice_id} paid"),
    )


def _on_customer(session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> None:
    customer = parse_customer_event(payload)
    deleted = customer.info.type == "customer.deleted" or customer.deleted
    apply_customer_snapshot(
        session,
        customer_id=customer.customer_id,
        provider="stripe",
        watermark=_watermark(customer.info),
        email=customer.email,
        name=customer.name,
        deleted=deleted,
        deleted_at=context.now if deleted else None,
    )


HANDLERS: dict[str, Callable[[Session, InboxEvent, dict[str, Any], HandlerContext], None]] = {
    **{name: _on_subscription for name in LIFECYCLE_RANK if name.startswith("customer.subscription.")},
    "invoice.paid": _on_invoice_paid,
    "customer.created": _on_customer,
    "customer.updated": _on_customer,
    "customer.deleted": _on_customer,
}


def handle(session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> bool:
    """Apply one Stripe event; a handler validates the whole event against its shape before it reads anything."""
    kind = event_type(payload)  # None for thin events: kept for reconciliation to fetch
    handler = HANDLERS.get(kind) if kind is not None else None
    if handler is None:
        return False
    handler(session, event, payload, context)
    return True
