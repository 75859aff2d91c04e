"""Applying Dodo Payments events: subscription snapshots and carts, the mirrored credit ledger,
low-balance alerts, and payments/refunds.

Ordering. Dodo delivers without order and more than once, a burst of events shares one envelope
`timestamp`, and each payload is the object's latest state at delivery. So the envelope timestamp
is not used to order anything:

- credit ledger entries are ordered by their own `created_at` and before/after chain
  (`app.ledger.mirror`), never by arrival;
- a subscription snapshot's watermark is (period start, terminal status, time of receipt):
  `previous_billing_date` only moves forward, so a snapshot of a later period is newer whatever its
  arrival; within one period a terminal status (cancelled, expired, failed) is final; otherwise the
  snapshot Tally received later was rendered later and is the newer state. Receipt time is the
  inbox row's `received_at` in whole seconds (stored as seconds since the period start, the
  watermark's rank); two snapshots of one period received within the same second keep the one
  stored first, and the nightly reconciliation asks Dodo;
- customers and payments/refunds carried in payloads: the later receipt wins, same reasoning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.billing.snapshots import Watermark
from app.billing.subscriptions import apply_customer_snapshot, apply_subscription_snapshot, ensure_customer
from app.db import insert_ignoring_conflicts, utcnow
from app.errors import PayloadError
from app.ledger.errors import LedgerError
from app.ledger.mirror import ProviderEntry, ensure_provider_entitlement, mirror_entry, note_display_precision
from app.ledger.service import lock_balance
from app.models import (
    CreditAlert,
    InboxEvent,
    ProviderPayment,
    SubscriptionCredit,
    SubscriptionMeter,
    SubscriptionMeterCredit,
)
from app.providers.base import HandlerContext
from app.providers.dodo.objects import (
    PROVIDER,
    DodoSubscription,
    event_type,
    parse_balance_low,
    parse_ledger_entry,
    parse_payment_or_refund,
    parse_subscription,
)

LEDGER_EVENTS = frozenset(
    {
        "credit.added",
        "credit.deducted",
        "credit.expired",
        "credit.rolled_over",
        "credit.rollover_forfeited",
        "credit.overage_charged",
        "credit.overage_reset",
        "credit.manual_adjustment",
    }
)

Handler = Callable[[Session, InboxEvent, dict[str, Any], HandlerContext], None]


def _received_seconds(event: InboxEvent) -> int:
    return int(event.received_at.timestamp())


def _on_subscription(session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> None:
    parsed = parse_subscription(payload)
    apply_subscription(session, parsed, event_id=event.provider_event_id, received_seconds=_received_seconds(event))


def apply_subscription(session: Session, parsed: DodoSubscription, *, event_id: str, received_seconds: int) -> bool:
    """Store a subscription snapshot (customer, state, cart) if it is newer; True when it was applied.

    The one path for webhooks and reconciliation; `received_seconds` is when the state was read from Dodo
    (a webhook's receipt, or reconciliation's fetch), see the module docstring.
    """
    snapshot = parsed.snapshot
    apply_customer_snapshot(
        session,
        customer_id=snapshot.customer_id,
        provider=PROVIDER,
        watermark=Watermark(at=received_seconds, rank=0, event_id=event_id),
        email=parsed.customer_email,
        name=parsed.customer_name,
        deleted=False,
    )
    period_start = int(snapshot.period_start.timestamp())  # type: ignore[union-attr]
    watermark = Watermark(at=period_start, rank=received_seconds - period_start, event_id=event_id)
    if not apply_subscription_snapshot(session, snapshot, watermark):
        return False  # an older state than the one stored: its cart is older too
    _replace_cart(session, parsed)
    return True


def _replace_cart(session: Session, parsed: DodoSubscription) -> None:
    """Store the subscription's entitlement terms and meters, and carry the terms onto the entitlements."""
    subscription_id, customer_id = parsed.snapshot.id, parsed.snapshot.customer_id
    for table in (SubscriptionCredit, SubscriptionMeter, SubscriptionMeterCredit):
        session.execute(delete(table).where(table.subscription_id == subscription_id))
    for line in parsed.cart:
        try:
            entitlement = ensure_provider_entitlement(session, line.entitlement_id, PROVIDER)
        except LedgerError as error:
            raise PayloadError(str(error)) from None
        overage_limit = line.overage_limit.atoms if line.overage_limit is not None else None
        entitlement.name, entitlement.unit = line.name, line.unit
        entitlement.overage_enabled, entitlement.overage_limit = line.overage_enabled, overage_limit
        note_display_precision(session, line.entitlement_id, line.places)
        session.add(
            SubscriptionCredit(
                subscription_id=subscription_id,
                entitlement_id=line.entitlement_id,
                product_id=line.product_id,
                credits_amount=line.credits_amount.atoms,
                overage_enabled=line.overage_enabled,
                overage_limit=overage_limit,
                overage_behavior=line.overage_behavior,
                rollover_enabled=line.rollover_enabled,
                reported_balance=line.remaining_balance.atoms if line.remaining_balance else None,
                reported_overage=line.overage_balance.atoms if line.overage_balance else None,
            )
        )
        # The customer's effective overage terms for this balance (it moves only with ledger entries).
        balance = lock_balance(session, customer_id, line.entitlement_id)
        balance.overage_enabled, balance.overage_limit = line.overage_enabled, overage_limit
    for meter in parsed.meters:
        session.add(
            SubscriptionMeter(
                subscription_id=subscription_id,
                meter_id=meter.meter_id,
                name=meter.name,
                description=meter.description,
                currency=meter.currency,
                free_threshold=meter.free_threshold,
                measurement_unit=meter.measurement_unit,
                price_per_unit=meter.price_per_unit,
            )
        )
    for link in parsed.meter_credits:
        session.add(
            SubscriptionMeterCredit(
                subscription_id=subscription_id,
                meter_id=link.meter_id,
                entitlement_id=link.entitlement_id,
                meter_name=link.meter_name,
                meter_units_per_credit=link.meter_units_per_credit,
            )
        )
    session.flush()


def _on_ledger_entry(session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> None:
    mirror_ledger_entry(session, parse_ledger_entry(payload), inbox_event_id=event.id)


def mirror_ledger_entry(session: Session, entry: ProviderEntry, *, inbox_event_id: int | None = None) -> None:
    """Mirror one Dodo ledger entry: the path of `credit.*` webhooks and of reconciliation's ledger listing."""
    ensure_customer(session, entry.customer_id, PROVIDER)
    try:
        mirror_entry(session, entry, inbox_event_id=inbox_event_id)
    except LedgerError as error:  # e.g. negative values, or an id Tally itself manages
        raise PayloadError(str(error)) from None


def _on_balance_low(session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> None:
    alert = parse_balance_low(payload)
    insert_ignoring_conflicts(
        session,
        CreditAlert,
        {
            "inbox_event_id": event.id,
            "provider": PROVIDER,
            "kind": "balance_low",
            "customer_id": alert.customer_id,
            "subscription_id": alert.subscription_id,
            "entitlement_id": alert.entitlement_id,
            "entitlement_name": alert.entitlement_name,
            "available_balance": alert.available_balance,
            "subscription_credits_amount": alert.subscription_credits_amount,
            "threshold_percent": alert.threshold_percent,
            "threshold_amount": alert.threshold_amount,
            "created_at": context.now,
        },
    )


def _on_payment(session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> None:
    kind = "refund" if event.type.startswith("refund.") else "payment"
    state = parse_payment_or_refund(kind, payload)
    insert_ignoring_conflicts(
        session,
        ProviderPayment,
        {
            "provider": PROVIDER,
            "kind": kind,
            "object_id": state.object_id,
            "last_event_type": event.type,
            "watermark_received_at": event.received_at,
            "created_at": utcnow(),
            "updated_at": utcnow(),
        },
    )
    row = session.execute(
        select(ProviderPayment)
        .where(ProviderPayment.provider == PROVIDER, ProviderPayment.object_id == state.object_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    if row.status is not None and event.received_at < row.watermark_received_at:
        return  # an older state than the one stored
    row.payment_id, row.customer_id, row.subscription_id = state.payment_id, state.customer_id, state.subscription_id
    row.status, row.amount, row.currency = state.status, state.amount, state.currency
    row.provider_created_at, row.last_event_type = state.created_at, event.type
    row.watermark_received_at = event.received_at


def _handler_for(event_type: str) -> Handler | None:
    if event_type.startswith("subscription."):
        return _on_subscription
    if event_type in LEDGER_EVENTS:
        return _on_ledger_entry
    if event_type == "credit.balance_low":
        return _on_balance_low
    if event_type.startswith(("payment.", "refund.")):
        return _on_payment
    return None


def handle(session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> bool:
    """Apply one Dodo event in the caller's transaction; False for types Tally keeps but does not use.

    Every envelope is validated (its `data` must be an object whatever the type); a handler then
    validates the whole event against its shape before it reads anything.
    """
    handler = _handler_for(event_type(payload))
    if handler is None:
        return False
    handler(session, event, payload, context)
    return True
