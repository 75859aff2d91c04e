"""`GET /subscriptions/{id}/usage-history` (seed 001), answered from locally metered usage.

One item per billing period of the subscription (newest first): the periods its meters recorded
usage in, and its current period even before any usage. Each lists the meters that deduct from the
subscription's entitlements with consumed units, the catalogue's free threshold, chargeable units
(`max(consumed - free_threshold, 0)`), the price per unit (major currency units, a decimal string)
and the total price in the currency's minor units.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalogue import Catalogue, MeterSpec
from app.db import Page
from app.errors import InvalidInput, NotFound
from app.metering.models import MeterUsage
from app.metering.service import format_units
from app.models import Balance, Subscription
from app.times import render_instant

ZERO_DECIMAL_CURRENCIES = frozenset(
    [
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "ISK",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    ]
)
THREE_DECIMAL_CURRENCIES = frozenset(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"])


def minor_units(amount: Decimal, currency: str) -> int:
    """An amount in major units as an integer of the currency's smallest unit, rounded half up."""
    exponent = 0 if currency in ZERO_DECIMAL_CURRENCIES else 3 if currency in THREE_DECIMAL_CURRENCIES else 2
    return int(amount.scaleb(exponent).to_integral_value(rounding=ROUND_HALF_UP))


@dataclass(frozen=True)
class HistoryQuery:
    start_date: datetime | None = None
    end_date: datetime | None = None
    meter_id: str | None = None


def meter_document(meter: MeterSpec, usage: MeterUsage | None) -> dict[str, Any]:
    consumed = Decimal(usage.consumed) if usage else Decimal(0)
    chargeable = max(consumed - meter.free_threshold, Decimal(0))
    return {
        "id": meter.key,
        "name": meter.display_name,
        "free_threshold": meter.free_threshold,
        "price_per_unit": format_units(meter.price_per_unit),
        "currency": meter.currency,
        "consumed_units": format_units(consumed),
        "chargeable_units": format_units(chargeable),
        "total_price": minor_units(chargeable * meter.price_per_unit, meter.currency),
    }


def usage_history(
    session: Session, catalogue: Catalogue, subscription_id: str, query: HistoryQuery, page: Page
) -> dict[str, Any]:
    subscription = session.get(Subscription, subscription_id)
    if subscription is None:
        raise NotFound(f"no subscription {subscription_id!r}", code="subscription_not_found")
    if query.meter_id is not None and query.meter_id not in catalogue.meters:
        raise InvalidInput(f"no meter {query.meter_id!r}", code="unknown_meter")
    if query.start_date and query.end_date and query.start_date > query.end_date:
        raise InvalidInput("start_date must not be after end_date", code="invalid_parameter")

    recorded = session.execute(select(MeterUsage).where(MeterUsage.subscription_id == subscription_id)).scalars().all()
    entitlements = set(
        session.execute(select(Balance.entitlement_id).where(Balance.subscription_id == subscription_id)).scalars()
    )
    entitlements |= {usage.entitlement_id for usage in recorded}
    meters = sorted(
        (
            meter
            for meter in catalogue.meters.values()
            if meter.entitlement in entitlements or any(u.meter_key == meter.key for u in recorded)
        ),
        key=lambda meter: meter.key,
    )
    if query.meter_id is not None:
        meters = [meter for meter in meters if meter.key == query.meter_id]

    periods: dict[tuple[datetime, datetime], dict[str, MeterUsage]] = {}
    for usage in recorded:
        if usage.period_start is not None and usage.period_end is not None:
            periods.setdefault((usage.period_start, usage.period_end), {})[usage.meter_key] = usage
    if subscription.current_period_start is not None and subscription.current_period_end is not None:
        periods.setdefault((subscription.current_period_start, subscription.current_period_end), {})

    selected = (
        [
            (start, end)
            for start, end in sorted(periods, reverse=True)
            if (query.start_date is None or end >= query.start_date)
            and (query.end_date is None or start <= query.end_date)
        ]
        if meters
        else []
    )
    window = selected[page.offset : page.offset + page.size]
    return {
        "items": [
            {
                "start_date": render_instant(start),
                "end_date": render_instant(end),
                "meters": [meter_document(meter, periods[(start, end)].get(meter.key)) for meter in meters],
            }
            for start, end in window
        ]
    }
