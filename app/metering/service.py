"""Applying stored usage events to the ledger through the catalogue's meters.

A meter (SPEC 5.2) turns events named `event_name` into units, units into credits through
`units_per_credit`, and deducts the credits from its entitlement's balance of the event's customer.

Aggregations, per customer, meter and billing period (the balance's current period when the event is
applied; one lifetime bucket for balances without periods):
- `count`: each event is one unit; `sum`: each event adds the number under the meter's metadata key.
  Both only grow, so an event's deduction is what it adds.
- `max` and `last` describe the period as a whole (peak seats, storage held now). The period's
  aggregate is the largest value seen (`max`) or the value of the newest event by timestamp (`last`,
  ties broken by event id, so out-of-order arrival does not matter). An event deducts the increase
  of the credits the aggregate is worth above what the period was already charged. Charges never go
  down within a period: a `last` value that drops deducts nothing and refunds nothing, and a later
  rise is charged only above the highest value charged (its high-water mark).
- Credits are the aggregate divided by `units_per_credit`, rounded up to the entitlement's precision,
  on the period's running total (not per event): 2,500 events at 1,000 units per credit cost 3
  credits, charged by the 1st, 1,001st and 2,001st event. A started credit is charged, so tiny events
  cannot slip under a limit.

An event is applied whole or refused whole (all its meters, in one savepoint). It is refused, and the
refusal recorded on the event for good, when the customer has no balance in the meter's entitlement,
the entitlement is provider-managed, or the ledger refuses the deduction (overage disabled, overage
limit, the plan's hard cap). The worker never retries a refusal, and an event is never applied twice:
it is locked and its status checked in the same transaction as its deductions, whose ledger
`dedupe_key` (`usage:<event_id>:<meter>`) is unique besides.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal, localcontext

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalogue import Catalogue, MeterSpec
from app.db import Database, utcnow
from app.doorbell import claim_stale_pending, ring
from app.ledger.amounts import MAX_ATOMS, AmountError
from app.ledger.errors import LedgerError, UnknownBalance
from app.ledger.posting import Source
from app.ledger.service import deduct, lock_balance
from app.metering.ingest import metered_value, meters_for
from app.metering.models import MeterUsage, UsageEvent
from app.models import Balance, CreditEntitlement

CHUNK_SIZE = 200
"""Events applied per transaction: amortises the commit without holding balance locks for long."""

EnqueueBatch = Callable[[list[int]], None]


class UsageRefused(LedgerError):
    """An event the ledger will not take; recorded on the event, never retried."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code=code)


def format_units(value: Decimal) -> str:
    """Plain decimal text, never exponent notation."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def credits_for(units: Decimal, units_per_credit: Decimal, precision: int) -> int:
    """Credits (atoms) that `units` are worth, rounded up to the entitlement's precision."""
    with localcontext() as context:
        context.prec = 80  # exact for any stored aggregate, so the ceiling is the true ceiling
        atoms = int((units / units_per_credit).scaleb(precision).to_integral_value(rounding=ROUND_CEILING))
    if atoms > MAX_ATOMS:
        raise AmountError(f"{format_units(units)} units are worth more credits than a balance can hold")
    return atoms


def period_key(balance: Balance) -> str:
    return balance.period_start.isoformat() if balance.period_start is not None else ""


@dataclass
class _ChunkState:
    """What one transaction has locked and loaded, so that each event costs as few round trips as possible."""

    balances: dict[tuple[str, str], Balance] = field(default_factory=dict)
    usages: dict[tuple[str, str, str], MeterUsage] = field(default_factory=dict)

    def usage(self, session: Session, balance: Balance, meter: MeterSpec) -> MeterUsage:
        """The meter's aggregate for the balance's current period; a new (not yet added) one on first use."""
        key = (balance.customer_id, meter.key, period_key(balance))
        usage = self.usages.get(key)
        if usage is None:
            usage = session.execute(
                select(MeterUsage).where(
                    MeterUsage.customer_id == key[0], MeterUsage.meter_key == key[1], MeterUsage.period_key == key[2]
                )
            ).scalar_one_or_none() or MeterUsage(
                customer_id=balance.customer_id,
                meter_key=meter.key,
                entitlement_id=meter.entitlement,
                period_key=key[2],
                subscription_id=balance.subscription_id,
                period_start=balance.period_start,
                period_end=balance.period_end,
                event_count=0,
                consumed="0",
                charged=0,
            )
            self.usages[key] = usage
        return usage


def aggregate(meter: MeterSpec, usage: MeterUsage, value: Decimal, event: UsageEvent) -> tuple[Decimal, bool]:
    """The period's aggregate once `event` (worth `value` units) is counted, and whether it is now the newest."""
    consumed = Decimal(usage.consumed)
    if meter.aggregation in ("count", "sum"):
        return consumed + value, False
    if meter.aggregation == "max":
        return max(consumed, value), False
    # last: the newest event by (timestamp, event_id) decides, whatever order they arrive in
    newest = usage.last_timestamp is None or (event.timestamp, event.event_id) >= (
        usage.last_timestamp,
        usage.last_event_id or "",
    )
    return (value if newest else consumed), newest


def _apply_meter(session: Session, event: UsageEvent, meter: MeterSpec, chunk: _ChunkState, now: datetime) -> None:
    """Deduct what the event adds to one meter. Nothing is changed before a refusal can be raised."""
    entitlement = session.get(CreditEntitlement, meter.entitlement)
    if entitlement is None:
        raise UsageRefused("no_balance", f"entitlement {meter.entitlement!r} of meter {meter.key!r} does not exist yet")
    if entitlement.managed_by != "tally":
        raise UsageRefused(
            "provider_managed", f"entitlement {meter.entitlement!r} is managed by {entitlement.managed_by}"
        )
    balance = chunk.balances.get((event.customer_id, meter.entitlement))
    if balance is None:
        raise UsageRefused("no_balance", f"customer {event.customer_id!r} has no balance in {meter.entitlement!r}")
    value = metered_value(meter, event.event_metadata)
    usage = chunk.usage(session, balance, meter)
    consumed, newest = aggregate(meter, usage, value, event)
    target = credits_for(consumed, meter.units_per_credit, entitlement.precision)
    charge = target - usage.charged
    if charge > 0:
        deduct(
            session,
            balance,
            charge,
            now=now,
            known_new=True,
            source=Source(
                dedupe_key=f"usage:{event.event_id}:{meter.key}",
                usage_event_id=event.event_id,
                description=f"meter {meter.key}",
            ),
        )
        usage.charged = target
    if usage.id is None and usage not in session:
        session.add(usage)
    if newest:
        usage.last_timestamp, usage.last_event_id = event.timestamp, event.event_id
    usage.consumed = format_units(consumed)
    usage.event_count += 1


def _apply_one(session: Session, catalogue: Catalogue, event: UsageEvent, chunk: _ChunkState, now: datetime) -> str:
    """Apply one locked pending event whole, or record why it is refused instead of raising."""
    try:
        meters = meters_for(catalogue, event.event_name)
        if not meters:
            raise UsageRefused("unknown_meter", f"no meter counts events named {event.event_name!r}")
        if len(meters) == 1:
            _apply_meter(session, event, meters[0], chunk, now)  # refusals come before any change
        else:
            try:
                with session.begin_nested():  # several meters: a refusal by one undoes the others
                    for meter in meters:
                        _apply_meter(session, event, meter, chunk, now)
            except (LedgerError, AmountError):
                chunk.usages.clear()  # aggregates changed inside the savepoint are stale now
                raise
        event.status = "applied"
    except (LedgerError, AmountError) as refusal:
        event.status = "refused"
        event.refusal_code = getattr(refusal, "code", "invalid_amount")
        event.refusal_message = str(refusal)
    event.applied_at = now
    return event.status


def _apply_chunk(session: Session, catalogue: Catalogue, ids: list[int], now: datetime) -> Counter[str]:
    pending = session.execute(
        select(UsageEvent.id, UsageEvent.customer_id, UsageEvent.event_name).where(
            UsageEvent.id.in_(ids), UsageEvent.status == "pending"
        )
    ).all()
    if not pending:
        return Counter()
    # Lock every balance the chunk touches up front, in one global order, so that two workers (or a
    # worker and the write API) never wait on each other in a cycle.
    chunk = _ChunkState()
    pairs = sorted(
        {(row.customer_id, meter.entitlement) for row in pending for meter in meters_for(catalogue, row.event_name)}
    )
    for customer_id, entitlement_id in pairs:
        with contextlib.suppress(UnknownBalance):
            chunk.balances[(customer_id, entitlement_id)] = lock_balance(
                session, customer_id, entitlement_id, create=False
            )
    events = (
        session.execute(
            select(UsageEvent)
            .where(UsageEvent.id.in_([row.id for row in pending]), UsageEvent.status == "pending")
            .order_by(UsageEvent.id)
            .with_for_update()
        )
        .scalars()
        .all()
    )
    return Counter(_apply_one(session, catalogue, event, chunk, now) for event in events)


def apply_usage_events(
    db: Database, catalogue: Catalogue, ids: Iterable[int], *, now: datetime | None = None, chunk_size: int = CHUNK_SIZE
) -> Counter[str]:
    """Apply pending events (already applied or refused ones are skipped); counts by outcome."""
    ordered = sorted(set(ids))
    outcomes: Counter[str] = Counter()
    for start in range(0, len(ordered), chunk_size):
        with db.write() as session:
            outcomes += _apply_chunk(session, catalogue, ordered[start : start + chunk_size], now or utcnow())
    return outcomes


def sweep_usage_events(
    db: Database,
    enqueue: EnqueueBatch,
    *,
    older_than: timedelta,
    now: datetime | None = None,
    limit: int = 5000,
    batch: int = 500,
) -> int:
    """Enqueue usage events still pending after `older_than` (lost message, crash, broker outage)."""
    now = now or utcnow()
    with db.write() as session:
        ids = claim_stale_pending(session, UsageEvent, cutoff=now - older_than, now=now, limit=limit)
    for start in range(0, len(ids), batch):
        ring(enqueue, ids[start : start + batch])
    return len(ids)
