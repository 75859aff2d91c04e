"""Billing periods of catalogue plans: what a plan grants for a period, and moving a balance into it.

The policy, stated once: a plan's period grants its included credits once (keyed by subscription
and period start), carries the plan's hard cap, and takes its overage terms from the plan where it
sets them, else from the entitlement; the overage limit is the tighter of the two.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalogue import Catalogue, PlanSpec
from app.ledger.amounts import to_atoms
from app.ledger.posting import Source
from app.ledger.service import PeriodTerms, lock_balance, start_period, sync_entitlement
from app.models import Balance


def period_terms(
    catalogue: Catalogue, plan: PlanSpec, *, subscription_id: str, start: datetime, end: datetime, precision: int
) -> PeriodTerms:
    """What `plan` gives for one period, in atoms at the entitlement's precision."""
    spec = catalogue.entitlement_for(plan)
    limits = [limit for limit in (plan.overage_limit, spec.overage_limit) if limit is not None]
    return PeriodTerms(
        subscription_id=subscription_id,
        plan_key=plan.key,
        start=start,
        end=end,
        included=to_atoms(plan.included, precision),
        hard_cap=None if plan.hard_cap is None else to_atoms(plan.hard_cap, precision),
        overage_enabled=spec.overage_enabled if plan.overage_enabled is None else plan.overage_enabled,
        overage_limit=to_atoms(min(limits), precision) if limits else None,
    )


def open_plan_period(
    session: Session,
    catalogue: Catalogue,
    plan: PlanSpec,
    *,
    customer_id: str,
    subscription_id: str,
    start: datetime,
    end: datetime,
    source: Source,
) -> bool:
    """Grant a plan's credits for a period (once), moving the customer's balance into it.

    Periods only move forward, so a balance already in this period or a later one (read without a
    lock) needs nothing: most events of a subscription are not its renewal, and they skip the lock
    that the renewal would otherwise make them wait for.
    """
    spec = catalogue.entitlement_for(plan)
    current = session.execute(
        select(Balance.period_start).where(Balance.customer_id == customer_id, Balance.entitlement_id == spec.id)
    ).scalar_one_or_none()
    if current is not None and start <= current:
        return False
    entitlement = sync_entitlement(session, spec)
    terms = period_terms(
        catalogue, plan, subscription_id=subscription_id, start=start, end=end, precision=entitlement.precision
    )
    balance = lock_balance(session, customer_id, spec.id)
    return start_period(session, balance, terms, source=source)
