"""`GET /usage` (seed 002): where a customer stands in its current billing period, from the database alone.

One statement answers it (`USAGE`): the customer, the subscription that speaks for it, that
subscription's newest balance and the balance's entitlement, run on the event loop by `OneRowRead`.
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, case, literal_column, select

from app.api.credit_documents import OneRowRead, RowLike, balances, customers, entitlements, subscriptions
from app.billing.subscriptions import LIVE_STATUSES
from app.db import AsyncDatabase
from app.ledger.amounts import from_atoms, json_number
from app.ledger.limits import period_limit_reached
from app.times import render_instant, render_optional

MIN_ELAPSED_FOR_PROJECTION = Decimal("0.01")
"""Below 1 % of a period there is no pace worth projecting from: `projected_used` is null."""


def _current_subscription_id() -> Any:
    """The subscription that speaks for the customer: the newest live one, else the newest of any.

    `app.billing.subscriptions.current_subscription`'s rule as a subquery: live ones first, then by
    period start (newest first, none last), then by creation. It reads the customer from the
    parameter, not from the outer row, so PostgreSQL runs it once (an InitPlan) and every join below
    is a primary-key lookup. The statuses are constants, inlined so there is no expanding parameter.
    """
    candidate = subscriptions.alias("candidate")
    live = candidate.c.status.in_([literal_column(f"'{status}'") for status in sorted(LIVE_STATUSES)])
    return (
        select(candidate.c.id)
        .where(candidate.c.customer_id == bindparam("customer_id"))
        .order_by(
            case((live, 0), else_=1),
            candidate.c.current_period_start.desc().nulls_last(),
            candidate.c.created_at.desc(),
        )
        .limit(1)
        .scalar_subquery()
    )


def _newest_balance_id(subscription_id: Any) -> Any:
    """The balance of that subscription's newest period (as `GET /usage` always read it)."""
    candidate = balances.alias("candidate_balance")
    return (
        select(candidate.c.id)
        .where(candidate.c.customer_id == bindparam("customer_id"), candidate.c.subscription_id == subscription_id)
        .order_by(candidate.c.period_start.desc())
        .limit(1)
        .scalar_subquery()
    )


USAGE = OneRowRead(
    select(
        customers.c.id.label("customer_id"),
        subscriptions.c.id.label("subscription_id"),
        subscriptions.c.status.label("status"),
        subscriptions.c.plan_key.label("plan_key"),
        subscriptions.c.price_id.label("price_id"),
        subscriptions.c.product_id.label("product_id"),
        subscriptions.c.cancel_at_period_end.label("cancel_at_period_end"),
        subscriptions.c.canceled_at.label("canceled_at"),
        subscriptions.c.current_period_start.label("subscription_start"),
        subscriptions.c.current_period_end.label("subscription_end"),
        balances.c.id.label("balance_id"),
        balances.c.period_included.label("period_included"),
        balances.c.period_used.label("period_used"),
        balances.c.hard_cap.label("hard_cap"),
        balances.c.overage_enabled.label("overage_enabled"),
        balances.c.period_start.label("period_start"),
        balances.c.period_end.label("period_end"),
        entitlements.c.id.label("entitlement_id"),
        entitlements.c.precision.label("precision"),
        entitlements.c.unit.label("unit"),
    )
    .select_from(customers)
    .outerjoin(subscriptions, subscriptions.c.id == _current_subscription_id())
    .outerjoin(balances, balances.c.id == _newest_balance_id(_current_subscription_id()))
    .outerjoin(entitlements, entitlements.c.id == balances.c.entitlement_id)
    .where(customers.c.id == bindparam("customer_id"))
)
"""Everything seed 002 needs, in one statement; no row means a customer Tally has not heard of yet."""


async def read_usage(adb: AsyncDatabase, customer_id: str) -> dict[str, Any]:
    """The `USAGE` row of a customer. One Tally has never heard of reads as an account with no
    subscription (status "none", zeroed credits), as seed 002 describes it: the gateway asks about
    every new account before any webhook about it has arrived."""
    row = await USAGE.fetch(adb, customer_id=customer_id)
    if row is None:
        return {**dict.fromkeys(USAGE.statement.selected_columns.keys()), "customer_id": customer_id}
    return row


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


def usage_document(row: RowLike, *, now: datetime, approaching_ratio: Decimal) -> dict[str, Any]:
    """Seed 002 from a `USAGE` row: built once, as the JSON answer's dict."""
    subscribed = row["subscription_id"] is not None
    with_balance = row["balance_id"] is not None and row["entitlement_id"] is not None
    zero = Decimal(0)
    included = used = zero
    hard_cap: Decimal | None = zero
    at_limit = False
    if with_balance:
        precision = row["precision"]
        included = from_atoms(row["period_included"], precision)
        used = from_atoms(row["period_used"], precision)
        hard_cap = None if row["hard_cap"] is None else from_atoms(row["hard_cap"], precision)
        at_limit = period_limit_reached(
            row["period_used"], row["period_included"], hard_cap=row["hard_cap"], overage_enabled=row["overage_enabled"]
        )
        start, end = row["period_start"], row["period_end"]
    elif subscribed:
        start, end = row["subscription_start"], row["subscription_end"]
    else:
        start = end = None
    period, fraction = _period(start, end, now)

    remaining = max(included - used, zero)
    overage = max(used - included, zero)
    live = subscribed and row["status"] in LIVE_STATUSES
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
        "customer_id": row["customer_id"],
        "plan": row["plan_key"],
        "plan_ids": {
            "subscription_id": row["subscription_id"],
            "price_id": row["price_id"],
            "product_id": row["product_id"],
        },
        "status": row["status"] if subscribed else "none",
        "usage_status": usage_status,
        "cancel_at_period_end": bool(subscribed and row["cancel_at_period_end"]),
        "canceled_at": render_optional(row["canceled_at"]),
        "unit": row["unit"] if with_balance else None,
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
