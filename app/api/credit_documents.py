"""Read models of the Dodo-shaped credit endpoints (seeds 000, 003, the balance ledger) and `/credits` (seed 004).

Shapes follow the seeds exactly: balances, overage and limits are decimal strings; `/credits` totals
are JSON numbers. Mirrored Dodo amounts are stored at precision 10 and rendered with the decimal
places Dodo itself used (at least), so "250.00" comes back as "250.00"; Tally-native entitlements
render at their own precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.api.pagination import Page
from app.ledger.amounts import from_atoms, json_number
from app.models import (
    Balance,
    CreditEntitlement,
    LedgerEntry,
    ProviderEntitlement,
    ProviderLedgerEntry,
    Subscription,
    SubscriptionCredit,
)

# Tally's entry kinds as Dodo transaction types, for entries Tally wrote itself.
TRANSACTION_TYPES = {
    "grant": "credit_added",
    "deduction": "credit_deducted",
    "expiry": "credit_expired",
    "rollover": "credit_rolled_over",
    "overage_charge": "overage_charged",
    "overage_reset": "overage_reset",
    "manual_adjustment": "manual_adjustment",
    "reconciliation_adjustment": "manual_adjustment",
    "refund": "refund",
}
USAGE_KINDS = ("deduction", "overage_charge")
"""Entries that count as usage in `/credits`."""


def iso(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, keeping microseconds when there are any (provider ledger times have them)."""
    if moment is None:
        return None
    return moment.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Format:
    """How to render one entitlement's atoms."""

    precision: int  # of the stored atoms
    display_precision: int  # fewest places to show

    def render(self, atoms: int) -> str:
        value = from_atoms(atoms, self.precision)
        exponent = value.normalize().as_tuple().exponent
        needed = -exponent if isinstance(exponent, int) and exponent < 0 else 0
        return f"{value:.{min(max(self.display_precision, needed), self.precision)}f}"

    def number(self, atoms: int) -> Decimal:
        return from_atoms(atoms, self.precision)


def format_for(session: Session, entitlement: CreditEntitlement) -> Format:
    if entitlement.managed_by == "tally":
        return Format(entitlement.precision, entitlement.precision)
    provider = session.get(ProviderEntitlement, entitlement.id)
    return Format(entitlement.precision, provider.display_precision if provider else 0)


def find_balance(session: Session, customer_id: str, entitlement_id: str) -> Balance | None:
    return session.execute(
        select(Balance).where(Balance.customer_id == customer_id, Balance.entitlement_id == entitlement_id)
    ).scalar_one_or_none()


# --- GET /subscriptions/{id}/credit-usage (seed 000) ---------------------------------------------


def usage_status(
    entitlement: CreditEntitlement,
    balance: Balance | None,
    *,
    overage_enabled: bool,
    overage_limit: int | None,
    fmt: Format,
) -> dict[str, Any]:
    """One CreditEntitlementUsageStatus.

    `limit_reached`: with overage enabled and a limit, overage >= limit (Dodo's rule); with unlimited
    overage, never; with overage disabled, when the balance is exhausted, since then every further
    deduction would need overage and fails. `remaining_headroom` is null unless there is a limit.
    """
    amount, overage = (balance.balance, balance.overage) if balance else (0, 0)
    limited = overage_enabled and overage_limit is not None
    if limited:
        limit_reached = overage >= overage_limit  # type: ignore[operator]
    else:
        limit_reached = (not overage_enabled) and amount <= 0
    return {
        "credit_entitlement_id": entitlement.id,
        "credit_entitlement_name": entitlement.name,
        "unit": entitlement.unit,
        "balance": fmt.render(amount),
        "overage": fmt.render(overage),
        "overage_enabled": overage_enabled,
        "overage_limit": None if overage_limit is None else fmt.render(overage_limit),
        "remaining_headroom": fmt.render(max(overage_limit - overage, 0)) if limited else None,  # type: ignore[operator]
        "limit_reached": limit_reached,
    }


def credit_usage_document(session: Session, subscription: Subscription) -> dict[str, Any]:
    """Every entitlement of the subscription: Dodo's cart lines, then Tally-native balances tied to it."""
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    lines = session.execute(
        select(SubscriptionCredit, CreditEntitlement)
        .join(CreditEntitlement, CreditEntitlement.id == SubscriptionCredit.entitlement_id)
        .where(SubscriptionCredit.subscription_id == subscription.id)
        .order_by(SubscriptionCredit.id)
    ).all()
    for line, entitlement in lines:
        seen.add(entitlement.id)
        items.append(
            usage_status(
                entitlement,
                find_balance(session, subscription.customer_id, entitlement.id),
                overage_enabled=line.overage_enabled,
                overage_limit=line.overage_limit,
                fmt=format_for(session, entitlement),
            )
        )
    native = session.execute(
        select(Balance, CreditEntitlement)
        .join(CreditEntitlement, CreditEntitlement.id == Balance.entitlement_id)
        .where(Balance.customer_id == subscription.customer_id, Balance.subscription_id == subscription.id)
        .order_by(Balance.id)
    ).all()
    for balance, entitlement in native:
        if entitlement.id not in seen:
            items.append(
                usage_status(
                    entitlement,
                    balance,
                    overage_enabled=balance.overage_enabled,
                    overage_limit=balance.overage_limit,
                    fmt=format_for(session, entitlement),
                )
            )
    return {"subscription_id": subscription.id, "items": items}


# --- GET /credit-entitlements/{ce}/balances/{customer_id} (seed 003) -----------------------------


def balance_document(session: Session, balance: Balance) -> dict[str, Any]:
    entitlement = session.get(CreditEntitlement, balance.entitlement_id)
    assert entitlement is not None
    fmt = format_for(session, entitlement)
    return {
        "id": str(balance.id),
        "customer_id": balance.customer_id,
        "credit_entitlement_id": balance.entitlement_id,
        "balance": fmt.render(balance.balance),
        "overage": fmt.render(balance.overage),
        "created_at": iso(balance.created_at),
        "updated_at": iso(balance.updated_at),
        "last_transaction_at": iso(balance.last_transaction_at),
    }


# --- GET …/balances/{customer_id}/ledger ---------------------------------------------------------


@dataclass(frozen=True)
class LedgerFilter:
    transaction_type: str | None = None
    start: datetime | None = None
    end: datetime | None = None


def _entry_document(
    entry: LedgerEntry, provider: ProviderLedgerEntry | None, balance: Balance, fmt: Format
) -> dict[str, Any]:
    extra = (provider.extra or {}) if provider else {}
    if provider is not None:
        transaction_type, is_credit, amount = provider.transaction_type, provider.is_credit, provider.amount
    else:
        transaction_type = TRANSACTION_TYPES.get(entry.kind, entry.kind)
        is_credit, amount = entry.amount > 0, abs(entry.amount)
    return {
        "id": entry.external_id or str(entry.id),
        "credit_entitlement_id": balance.entitlement_id,
        "customer_id": balance.customer_id,
        "transaction_type": transaction_type,
        "is_credit": is_credit,
        "amount": fmt.render(amount),
        "balance_before": fmt.render(entry.balance_before),
        "balance_after": fmt.render(entry.balance_after),
        "overage_before": fmt.render(entry.overage_before),
        "overage_after": fmt.render(entry.overage_after),
        "grant_id": provider.provider_grant_id if provider else (str(entry.grant_id) if entry.grant_id else None),
        "description": entry.description,
        "reference_type": provider.reference_type if provider else None,
        "reference_id": provider.reference_id if provider else (entry.usage_event_id or entry.idempotency_key),
        "metadata": extra.get("metadata") or {},
        "brand_id": extra.get("brand_id", ""),
        "business_id": extra.get("business_id", ""),
        "created_at": iso(entry.created_at),
    }


def ledger_document(session: Session, balance: Balance, page: Page, filters: LedgerFilter) -> dict[str, Any]:
    """The balance's entries, newest first in the provider's order (time, then chain position)."""
    entitlement = session.get(CreditEntitlement, balance.entitlement_id)
    assert entitlement is not None
    query = (
        select(LedgerEntry, ProviderLedgerEntry)
        .outerjoin(ProviderLedgerEntry, ProviderLedgerEntry.ledger_entry_id == LedgerEntry.id)
        .where(LedgerEntry.balance_id == balance.id)
    )
    if filters.transaction_type:
        kinds = [kind for kind, name in TRANSACTION_TYPES.items() if name == filters.transaction_type]
        query = query.where(
            or_(
                ProviderLedgerEntry.transaction_type == filters.transaction_type,
                and_(ProviderLedgerEntry.ledger_entry_id.is_(None), LedgerEntry.kind.in_(kinds)),
            )
        )
    if filters.start:
        query = query.where(LedgerEntry.created_at >= filters.start)
    if filters.end:
        query = query.where(LedgerEntry.created_at <= filters.end)
    rows = session.execute(
        query.order_by(
            LedgerEntry.created_at.desc(),
            func.coalesce(ProviderLedgerEntry.chain_position, -1).desc(),
            LedgerEntry.id.desc(),
        )
        .limit(page.size)
        .offset(page.offset)
    ).all()
    fmt = format_for(session, entitlement)
    return {"items": [_entry_document(entry, provider, balance, fmt) for entry, provider in rows]}


# --- GET /credits (seed 004) ---------------------------------------------------------------------


def credits_document(session: Session, customer_id: str) -> dict[str, Any]:
    """Totals over all the customer's balances, as numbers.

    `total_usage` is what deductions and overage charges consumed; `total_credits` is everything the
    customer was given net of expiries (grants, top-ups, rollovers, adjustments, refunds, reset
    overage), so that `total_credits - total_usage` is the current net position, balance - overage.
    """
    usage_by_balance = dict(
        session.execute(
            select(LedgerEntry.balance_id, func.coalesce(func.sum(LedgerEntry.amount), 0))
            .join(Balance, Balance.id == LedgerEntry.balance_id)
            .where(Balance.customer_id == customer_id, LedgerEntry.kind.in_(USAGE_KINDS))
            .group_by(LedgerEntry.balance_id)
        ).all()
    )
    total_credits = total_usage = Decimal(0)
    balances = session.execute(
        select(Balance, CreditEntitlement)
        .join(CreditEntitlement, CreditEntitlement.id == Balance.entitlement_id)
        .where(Balance.customer_id == customer_id)
    ).all()
    for balance, entitlement in balances:
        precision = entitlement.precision
        usage = from_atoms(-int(usage_by_balance.get(balance.id, 0)), precision)
        total_usage += usage
        total_credits += from_atoms(balance.balance - balance.overage, precision) + usage
    return {"data": {"total_credits": json_number(total_credits), "total_usage": json_number(total_usage)}}
