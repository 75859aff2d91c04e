"""Helpers shared by the metering tests: customers and balances set up through the real services."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from app.api.metering import entry_answer
from app.billing.subscriptions import ensure_customer
from app.config import get_settings
from app.db import Database, utcnow
from app.metering import entries
from app.metering.models import UsageEvent
from app.models import Balance, LedgerEntry


def new_customer(db: Database, prefix: str = "cus") -> str:
    customer_id = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with db.write() as session:
        ensure_customer(session, customer_id, "stripe")
    return customer_id


def post_entry(
    db: Database,
    entitlement_id: str,
    customer_id: str,
    entry_type: str,
    amount: str,
    *,
    key: str | None = None,
    now: datetime | None = None,
    **extra: Any,
) -> tuple[int, dict[str, Any]]:
    """The write API's service, called and answered as the route does: (status, body)."""
    request = entries.parse_entry_request(
        {"entry_type": entry_type, "amount": amount, "idempotency_key": key or uuid.uuid4().hex, **extra}
    )
    return entry_answer(
        entries.create_ledger_entry(
            db,
            get_settings().catalogue,
            entitlement_id=entitlement_id,
            customer_id=customer_id,
            request=request,
            now=now or utcnow(),
        )
    )


def balance_of(db: Database, customer_id: str, entitlement_id: str) -> Balance | None:
    with db.read() as session:
        return session.execute(
            select(Balance).where(Balance.customer_id == customer_id, Balance.entitlement_id == entitlement_id)
        ).scalar_one_or_none()


def entry_count(db: Database, **where: Any) -> int:
    with db.read() as session:
        query = select(func.count()).select_from(LedgerEntry)
        for name, value in where.items():
            query = query.where(getattr(LedgerEntry, name) == value)
        return int(session.execute(query).scalar_one())


def usage_event(db: Database, event_id: str) -> UsageEvent | None:
    with db.read() as session:
        return session.execute(select(UsageEvent).where(UsageEvent.event_id == event_id)).scalar_one_or_none()


def usage_event_count(db: Database) -> int:
    with db.read() as session:
        return int(session.execute(select(func.count()).select_from(UsageEvent)).scalar_one())
