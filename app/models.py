"""The SQL schema. Alembic migrations (migrations/) are the only way it is created.

Amounts are stored as integer atoms at their entitlement's precision (as TigerBeetle and Formance
do), so arithmetic in SQL is exact on SQLite as well as PostgreSQL; `app.ledger.amounts` converts
at the edges.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db import UTCDateTime, utcnow

# BIGINT primary keys that still autoincrement on SQLite (where only INTEGER aliases the rowid).
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


# --- the inbox: every verified webhook, exactly as received ---------------------------------------


class InboxEvent(Base):
    """A provider event, stored before it is acknowledged. The durable record; the broker only rings."""

    __tablename__ = "inbox_events"
    __table_args__ = (
        UniqueConstraint("provider", "provider_event_id"),
        Index("ix_inbox_events_status_received_at", "status", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(16))
    provider_event_id: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(255))
    body: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # pending -> processed | skipped (no handler) | failed (dead letter, replayable)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_enqueued_at: Mapped[datetime | None]
    processed_at: Mapped[datetime | None]


# --- billing objects mirrored from the providers -------------------------------------------------


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # the provider's customer id
    provider: Mapped[str] = mapped_column(String(16))
    email: Mapped[str | None] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(255))
    deleted_at: Mapped[datetime | None]
    watermark_at: Mapped[int] = mapped_column(BigInteger, default=0)
    watermark_rank: Mapped[int] = mapped_column(Integer, default=0)
    watermark_event_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Subscription(Base):
    """The newest known snapshot of a provider subscription, guarded by a watermark."""

    __tablename__ = "subscriptions"
    __table_args__ = (Index("ix_subscriptions_customer_id", "customer_id"),)

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.id"))
    status: Mapped[str] = mapped_column(String(32))
    plan_key: Mapped[str | None] = mapped_column(String(255))
    product_id: Mapped[str | None] = mapped_column(String(255))
    price_id: Mapped[str | None] = mapped_column(String(255))
    quantity: Mapped[int] = mapped_column(Integer, default=1)
    current_period_start: Mapped[datetime | None]
    current_period_end: Mapped[datetime | None]
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False)
    canceled_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    # Watermark of the snapshot applied last: provider time (seconds), then an order rank within
    # that second, then the changed-from values of that event for causal tie-breaking.
    watermark_at: Mapped[int] = mapped_column(BigInteger, default=0)
    watermark_rank: Mapped[int] = mapped_column(Integer, default=0)
    watermark_event_id: Mapped[str | None] = mapped_column(String(255))
    watermark_previous: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# --- the ledger ----------------------------------------------------------------------------------


class CreditEntitlement(Base):
    __tablename__ = "credit_entitlements"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    # "tally" for entitlements Tally owns (catalogue), or the provider that owns the ledger ("dodo").
    managed_by: Mapped[str] = mapped_column(String(16), default="tally")
    name: Mapped[str] = mapped_column(String(255))
    unit: Mapped[str] = mapped_column(String(255))
    precision: Mapped[int] = mapped_column(Integer, default=0)
    overage_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    overage_limit: Mapped[int | None] = mapped_column(BigInteger)  # atoms; None: unlimited
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Balance(Base):
    """A customer's position in one entitlement. Changed only together with a ledger entry."""

    __tablename__ = "balances"
    __table_args__ = (UniqueConstraint("customer_id", "entitlement_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.id"))
    entitlement_id: Mapped[str] = mapped_column(ForeignKey("credit_entitlements.id"))
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    overage: Mapped[int] = mapped_column(BigInteger, default=0)
    # Effective overage settings for this customer (a plan's hard cap narrows the entitlement's).
    overage_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    overage_limit: Mapped[int | None] = mapped_column(BigInteger)
    # The billing period the balance is in, for plans that grant credits per period.
    subscription_id: Mapped[str | None] = mapped_column(String(255))
    plan_key: Mapped[str | None] = mapped_column(String(255))
    period_start: Mapped[datetime | None]
    period_end: Mapped[datetime | None]
    period_included: Mapped[int] = mapped_column(BigInteger, default=0)
    period_used: Mapped[int] = mapped_column(BigInteger, default=0)
    hard_cap: Mapped[int | None] = mapped_column(BigInteger)  # None: unlimited
    entry_count: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    last_transaction_at: Mapped[datetime | None]


class Grant(Base):
    """Credits added to a balance, consumed oldest first and expired at `expires_at`."""

    __tablename__ = "grants"
    __table_args__ = (Index("ix_grants_balance_id_remaining", "balance_id", "remaining"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    balance_id: Mapped[int] = mapped_column(ForeignKey("balances.id"))
    source_key: Mapped[str] = mapped_column(String(255), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    starts_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerEntry(Base):
    """One append-only movement of a balance.

    `amount` is the signed change of the net position (balance minus overage), so for every balance
    `balance - overage == sum(amount)`, and each entry's before/after values chain onto the previous.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_entries_balance_id_id", "balance_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    balance_id: Mapped[int] = mapped_column(ForeignKey("balances.id"))
    kind: Mapped[str] = mapped_column(String(32))
    amount: Mapped[int] = mapped_column(BigInteger)
    balance_before: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    overage_before: Mapped[int] = mapped_column(BigInteger)
    overage_after: Mapped[int] = mapped_column(BigInteger)
    grant_id: Mapped[int | None] = mapped_column(ForeignKey("grants.id"))
    # Where it came from, and what makes it happen once: a unique key per cause.
    dedupe_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    inbox_event_id: Mapped[int | None] = mapped_column(ForeignKey("inbox_events.id"))
    usage_event_id: Mapped[str | None] = mapped_column(String(255))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    external_id: Mapped[str | None] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- access --------------------------------------------------------------------------------------


class ApiKey(Base):
    """A token for the internal API, stored as a SHA-256 hash (tokens are random, not passwords)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))  # service | customer
    customer_id: Mapped[str | None] = mapped_column(String(255))
    label: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
