"""`GET /usage` (seed 002): where a customer stands in its current billing period, from the database alone."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.billing.subscriptions import LIVE_STATUSES, current_subscription
from app.ledger.amounts import from_atoms, json_number
from app.ledger.limits import period_limit_reached
from app.models import Balance, CreditEntitlement, Subscription
from app.times import render_instant, render_optional

MIN_ELAPSED_FOR_PROJECTION = Decimal("0.01")
"""Below 1 % of a period there is no pace worth projecting from: `projected_used` is null."""


def _period(start: datetime | None, end: datetime | None, now: datetime) -> tuple[dict[str, Any] | None, Decimal]:
    if start is None or end is None or end <= start:
        return None, Decimal(0)
    length = Decimal((end - start).total_seconds())
    elapsed = min(max(Decimal((now - start).total_seconds()), Decimal(0)), length)
    fraction = elapsed / length
    remaining_days = max((end - now).total_seconds(), 0) / 86400
    return {
        "start": render_instant(start),
        "end": render_instant(end),
        "days_remaining": math.ceil(remaining_days),
        "elapsed_fraction": float(round(fraction, 4)),
    }, fraction


def _balance_for(session: Session, subscription: Subscription) -> tuple[Balance | None, CreditEntitlement | None]:
    row = session.execute(
        select(Balance, CreditEntitlement)
        .join(CreditEntitlement, CreditEntitlement.id == Balance.entitlement_id)
        .where(Balance.customer_id == subscription.customer_id, Balance.subscription_id == subscription.id)
        .order_by(Balance.period_start.desc())
        .limit(1)
    ).first()
    return (row[0], row[1]) if row else (None, None)


def usage_document(session: Session, customer_id: str, *, now: datetime, approaching_ratio: Decimal) -> dict[str, Any]:
    subscription = current_subscription(session, customer_id)
    balance, entitlement = _balance_for(session, subscription) if subscription else (None, None)
    zero = Decimal(0)
    included = used = zero
    hard_cap: Decimal | None = zero
    at_limit = False
    if balance is not None and entitlement is not None:
        precision = entitlement.precision
        included = from_atoms(balance.period_included, precision)
        used = from_atoms(balance.period_used, precision)
        hard_cap = None if balance.hard_cap is None else from_atoms(balance.hard_cap, precision)
        at_limit = period_limit_reached(
            balance.period_used,
            balance.period_included,
            hard_cap=balance.hard_cap,
            overage_enabled=balance.overage_enabled,
        )
        start, end = balance.period_start, balance.period_end
    elif subscription is not None:
        start, end = subscription.current_period_start, subscription.current_period_end
    else:
        start = end = None
    period, fraction = _period(start, end, now)

    remaining = max(included - used, zero)
    overage = max(used - included, zero)
    live = subscription is not None and subscription.status in LIVE_STATUSES
    if not live:
        usage_status = "inactive"
    elif at_limit:
        usage_status = "limit_reached"
    elif overage > 0:
        usage_status = "in_overage"
    elif included > 0 and used >= included * approaching_ratio:
        usage_status = "approaching_limit"
    else:
        usage_status = "ok"
    percent = (used / included * 100) if included else zero
    projected = None
    if period is not None and fraction >= MIN_ELAPSED_FOR_PROJECTION:
        projected = json_number((used / fraction).to_integral_value())

    return {
        "customer_id": customer_id,
        "plan": subscription.plan_key if subscription else None,
        "plan_ids": {
            "subscription_id": subscription.id if subscription else None,
            "price_id": subscription.price_id if subscription else None,
            "product_id": subscription.product_id if subscription else None,
        },
        "status": subscription.status if subscription else "none",
        "usage_status": usage_status,
        "cancel_at_period_end": bool(subscription and subscription.cancel_at_period_end),
        "canceled_at": render_optional(subscription.canceled_at) if subscription else None,
        "unit": entitlement.unit if entitlement else None,
        "as_of": render_instant(now.replace(microsecond=0)),
        "period": period,
        "credits": {
            "included": json_number(included),
            "used": json_number(used),
            "remaining": json_number(remaining),
            "overage": json_number(overage),
            "percent_used": float(round(percent, 2)),
            "projected_used": projected,
            "hard_cap": "unlimited" if hard_cap is None else json_number(hard_cap),
            "in_overage": overage > 0,
        },
    }
