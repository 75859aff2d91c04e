"""The SQL schema. Alembic migrations (migrations/) are the only way it is created.

Amounts are stored as integer atoms at their entitlement's precision (as TigerBeetle and Formance
do), so arithmetic in SQL is exact on SQLite as well as PostgreSQL; `app.ledger.amounts` converts
at the edges.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

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
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


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


# --- mirrors of provider ledgers and Dodo subscription carts (issue #3) ---------------------------


class ProviderEntitlement(Base):
    """What Tally knows about a provider-owned entitlement beyond `credit_entitlements`.

    Mirrored amounts are stored at precision 10 (the provider's maximum) because the payloads do not
    carry the entitlement's precision; `display_precision` is the most decimal places seen in the
    provider's own decimal strings, so responses render "250.00" as the provider does.
    """

    __tablename__ = "provider_entitlements"

    entitlement_id: Mapped[str] = mapped_column(ForeignKey("credit_entitlements.id"), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16))
    display_precision: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ProviderLedgerEntry(Base):
    """The provider's side of a mirrored ledger entry: its id, type and fields, and its chain position.

    `chain_position` is the entry's place in the provider's order (created_at, then before/after
    linkage), recomputed when an entry arrives late. `follows_gap` marks an entry whose
    balance/overage before differs from the previous entry's after (or from zero for the first):
    a missing link left for reconciliation, with the values that were expected.
    """

    __tablename__ = "provider_ledger_entries"
    __table_args__ = (
        UniqueConstraint("provider", "external_id"),
        Index("ix_provider_ledger_entries_balance_id_follows_gap", "balance_id", "follows_gap"),
    )

    ledger_entry_id: Mapped[int] = mapped_column(ForeignKey("ledger_entries.id"), primary_key=True)
    balance_id: Mapped[int] = mapped_column(ForeignKey("balances.id"))
    provider: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(String(255))
    transaction_type: Mapped[str] = mapped_column(String(64))
    is_credit: Mapped[bool] = mapped_column(Boolean)
    amount: Mapped[int] = mapped_column(BigInteger)  # the provider's (positive) amount, in atoms
    provider_grant_id: Mapped[str | None] = mapped_column(String(255))
    reference_type: Mapped[str | None] = mapped_column(String(255))
    reference_id: Mapped[str | None] = mapped_column(String(255))
    extra: Mapped[dict[str, Any] | None]  # metadata, brand_id, business_id as the provider sent them
    chain_position: Mapped[int] = mapped_column(BigInteger, default=0)
    follows_gap: Mapped[bool] = mapped_column(Boolean, default=False)
    expected_balance_before: Mapped[int | None] = mapped_column(BigInteger)
    expected_overage_before: Mapped[int | None] = mapped_column(BigInteger)


class SubscriptionCredit(Base):
    """A Dodo subscription's `credit_entitlement_cart` line: the entitlement's terms on that subscription.

    `reported_balance`/`reported_overage` are the provider's figures at snapshot time, kept for
    reconciliation only; the balance itself moves only with mirrored ledger entries.
    """

    __tablename__ = "subscription_credits"
    __table_args__ = (UniqueConstraint("subscription_id", "entitlement_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subscription_id: Mapped[str] = mapped_column(ForeignKey("subscriptions.id"))
    entitlement_id: Mapped[str] = mapped_column(ForeignKey("credit_entitlements.id"))
    product_id: Mapped[str | None] = mapped_column(String(255))
    credits_amount: Mapped[int] = mapped_column(BigInteger)  # atoms at the entitlement's precision
    overage_enabled: Mapped[bool] = mapped_column(Boolean)
    overage_limit: Mapped[int | None] = mapped_column(BigInteger)  # atoms; None: unlimited
    overage_behavior: Mapped[str | None] = mapped_column(String(64))
    rollover_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    reported_balance: Mapped[int | None] = mapped_column(BigInteger)
    reported_overage: Mapped[int | None] = mapped_column(BigInteger)


class SubscriptionMeter(Base):
    """A usage meter attached to a Dodo subscription (`meters[]`), for usage features to join on."""

    __tablename__ = "subscription_meters"
    __table_args__ = (UniqueConstraint("subscription_id", "meter_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subscription_id: Mapped[str] = mapped_column(ForeignKey("subscriptions.id"))
    meter_id: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    currency: Mapped[str | None] = mapped_column(String(8))
    free_threshold: Mapped[int] = mapped_column(BigInteger, default=0)
    measurement_unit: Mapped[str | None] = mapped_column(String(255))
    price_per_unit: Mapped[str | None] = mapped_column(String(64))  # decimal string, as the provider sends it


class SubscriptionMeterCredit(Base):
    """`meter_credit_entitlement_cart[]`: which meter draws on which entitlement, at what rate."""

    __tablename__ = "subscription_meter_credits"
    __table_args__ = (
        UniqueConstraint("subscription_id", "meter_id", "entitlement_id", name="uq_subscription_meter_credits_key"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    subscription_id: Mapped[str] = mapped_column(ForeignKey("subscriptions.id"))
    meter_id: Mapped[str] = mapped_column(String(255))
    entitlement_id: Mapped[str] = mapped_column(String(255))
    meter_name: Mapped[str | None] = mapped_column(String(255))
    meter_units_per_credit: Mapped[str] = mapped_column(String(64))  # decimal string


class CreditAlert(Base):
    """A provider's low-balance alert (Dodo `credit.balance_low`), kept as received."""

    __tablename__ = "credit_alerts"
    __table_args__ = (Index("ix_credit_alerts_customer_id", "customer_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    inbox_event_id: Mapped[int] = mapped_column(ForeignKey("inbox_events.id"), unique=True)
    provider: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(32))  # balance_low
    customer_id: Mapped[str] = mapped_column(String(255))
    subscription_id: Mapped[str | None] = mapped_column(String(255))
    entitlement_id: Mapped[str] = mapped_column(String(255))
    entitlement_name: Mapped[str | None] = mapped_column(String(255))
    available_balance: Mapped[str] = mapped_column(String(64))  # decimal strings, as sent
    subscription_credits_amount: Mapped[str | None] = mapped_column(String(64))
    threshold_percent: Mapped[int | None] = mapped_column(Integer)
    threshold_amount: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProviderPayment(Base):
    """The newest known state of a provider payment or refund (Dodo `payment.*`, `refund.*`)."""

    __tablename__ = "provider_payments"
    __table_args__ = (
        UniqueConstraint("provider", "object_id"),
        Index("ix_provider_payments_customer_id", "customer_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))  # payment | refund
    object_id: Mapped[str] = mapped_column(String(255))
    payment_id: Mapped[str | None] = mapped_column(String(255))  # a refund's payment
    customer_id: Mapped[str | None] = mapped_column(String(255))
    subscription_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str | None] = mapped_column(String(64))
    amount: Mapped[int | None] = mapped_column(BigInteger)  # minor currency units, as sent
    currency: Mapped[str | None] = mapped_column(String(8))
    last_event_type: Mapped[str] = mapped_column(String(255))
    # The inbox receipt time of the snapshot applied last: payloads are the state at delivery.
    watermark_received_at: Mapped[datetime]
    provider_created_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
