"""The metering tables: usage events as reported, per-period meter aggregates, API idempotency records.

Meter units are kept as exact decimal strings (they are never summed in SQL: every change happens in
Python under the balance's row lock), credits as integer atoms like the rest of the ledger.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import utcnow
from app.models import Base, BigId


class UsageEvent(Base):
    """One usage event as a service reported it, stored before ingest answers and applied by a worker.

    `status` is pending -> applied | refused | failed. A refusal is final: the event keeps its refusal
    code, and a redelivery of the same `event_id` is absorbed by the unique constraint, so it can never
    turn into a success later. `failed` is a dead letter: an event whose application kept failing (not a
    refusal), after `attempts`, with its `last_error`.
    """

    __tablename__ = "usage_events"
    __table_args__ = (
        Index("ix_usage_events_status_received_at", "status", "received_at"),
        Index("ix_usage_events_customer_id_timestamp", "customer_id", "timestamp"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.id"))
    event_name: Mapped[str] = mapped_column(String(255))
    timestamp: Mapped[datetime]
    event_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    refusal_code: Mapped[str | None] = mapped_column(String(64))
    refusal_message: Mapped[str | None] = mapped_column(Text)
    applied_at: Mapped[datetime | None]
    last_enqueued_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)


class MeterUsage(Base):
    """A meter's aggregate for one customer in one billing period (`period_key` "" when there is none).

    `consumed` is the aggregate (count, sum, max or last) of the applied events; `charged` is the
    credits (atoms) deducted for it so far, which only grows: see app.metering.service.
    """

    __tablename__ = "meter_usage"
    __table_args__ = (
        UniqueConstraint("customer_id", "meter_key", "period_key"),
        Index("ix_meter_usage_subscription_id_period_start", "subscription_id", "period_start"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.id"))
    meter_key: Mapped[str] = mapped_column(String(255))
    entitlement_id: Mapped[str] = mapped_column(ForeignKey("credit_entitlements.id"))
    period_key: Mapped[str] = mapped_column(String(64))
    subscription_id: Mapped[str | None] = mapped_column(String(255))
    period_start: Mapped[datetime | None]
    period_end: Mapped[datetime | None]
    event_count: Mapped[int] = mapped_column(BigInteger, default=0)
    consumed: Mapped[str] = mapped_column(String(80), default="0")
    last_timestamp: Mapped[datetime | None]
    last_event_id: Mapped[str | None] = mapped_column(String(255))
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class LedgerRequest(Base):
    """The decision a synchronous ledger-entry request's idempotency key names: its entry, or a refusal.

    A retry with the same key and body gets this decision again; the same key with a different body
    is a conflict. The decision is stored, not an HTTP answer: the API layer renders it.
    """

    __tablename__ = "ledger_requests"
    __table_args__ = (UniqueConstraint("entitlement_id", "customer_id", "idempotency_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    entitlement_id: Mapped[str] = mapped_column(ForeignKey("credit_entitlements.id"))
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.id"))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    refusal_code: Mapped[str | None] = mapped_column(String(64))  # None: accepted, see ledger_entry_id
    refusal_message: Mapped[str | None] = mapped_column(Text)
    ledger_entry_id: Mapped[int | None] = mapped_column(ForeignKey("ledger_entries.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
