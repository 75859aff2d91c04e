"""Applying stored usage events to the ledger through the catalogue's meters, a batch at a time.

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

An event is applied whole or refused whole (all its meters: they are computed against a checkpoint of
the batch's state and kept only if none is refused). It is refused, and the refusal recorded on the
event for good, when the customer has no balance in the meter's entitlement, the entitlement is
provider-managed, the metered value or the period's aggregate cannot be kept exactly, or the ledger
refuses the deduction (overage disabled, overage limit, the plan's hard cap). The worker never
retries a refusal, and an event is never applied twice: it is locked and its status checked in the
same transaction as its deductions, whose ledger `dedupe_key` (`usage:<event_id>:<meter>`) is unique
besides.

Set-based: a transaction claims up to `CHUNK_SIZE` pending events (the message's, topped up by the
worker with other pending ones; `FOR UPDATE SKIP LOCKED`, so overlapping messages never apply an event
twice nor wait on each other's events), locks every balance they touch once in the one global order
(`LedgerBatch.lock`), reads the live grants and meter aggregates once, computes every event in memory
through `posting.plan`, and writes the ledger entries, the balances, the grants, the aggregates (an
upsert) and the events' marks with one statement per table, sent as one (`posting.Writes`): about six
round trips and one commit for the whole batch, where it was about seven statements per event.

A batch whose transaction fails (not a refusal: a database error, a bug) is split in halves until the
failing event is alone; the others apply at once. The lone event's attempt is counted with its error
and it is retried (the actor raises), then dead-lettered as `failed` after `max_attempts`, like an
inbox event: never left pending for good.
"""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Context, Decimal, Inexact, localcontext
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.catalogue import Catalogue, MeterSpec
from app.db import Database, table_of, utcnow
from app.doorbell import claim_stale_pending, ring
from app.ledger.amounts import MAX_ATOMS, AmountError
from app.ledger.errors import LedgerError
from app.ledger.posting import Source, Writes, among
from app.ledger.service import Account, Checkpoint, LedgerBatch
from app.metering.ingest import metered_value, meters_for
from app.metering.models import MeterUsage, UsageEvent
from app.models import CreditEntitlement

log = logging.getLogger(__name__)

CHUNK_SIZE = 500
"""Events applied per transaction at most. The batch's cost is mostly per transaction (about seven round trips
and a commit, balances locked meanwhile), so larger batches apply more events per second; 500 keeps the locks
held for tens of milliseconds, which a concurrent write to the same balance waits out."""

DEFAULT_MAX_ATTEMPTS = 8
"""Attempts at an event that fails (not a refusal) before it is dead-lettered; the worker passes TALLY_MAX_ATTEMPTS."""

MAX_ERROR_LENGTH = 4000

EnqueueBatch = Callable[[list[int]], None]
PendingEvent = Row[*tuple[Any, ...]]
"""A locked `usage_events` row: id, event_id, customer_id, event_name, timestamp, metadata."""

USAGE_EVENTS = table_of(UsageEvent)
METER_USAGE = table_of(MeterUsage)
ENTITLEMENTS = table_of(CreditEntitlement)
CONSUMED_LENGTH: int = METER_USAGE.c.consumed.type.length  # type: ignore[attr-defined]
"""`meter_usage.consumed` is exact decimal text of at most this many characters."""
_EXACT = Context(prec=CONSUMED_LENGTH, traps=[Inexact])
"""Sums of units, exact or refused: the default context (28 digits) would round 31 digits and 20 places."""


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


def period_key(account: Account) -> str:
    return account.period_start.isoformat() if account.period_start is not None else ""


@dataclass
class MeterTotal:
    """A meter's aggregate for one customer and period as a batch holds it: a `meter_usage` row, written if changed."""

    customer_id: str
    meter_key: str
    entitlement_id: str
    period_key: str
    subscription_id: str | None
    period_start: datetime | None
    period_end: datetime | None
    event_count: int = 0
    consumed: str = "0"
    last_timestamp: datetime | None = None
    last_event_id: str | None = None
    charged: int = 0
    changed: bool = False

    def row(self, now: datetime) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "meter_key": self.meter_key,
            "period_key": self.period_key,
            "entitlement_id": self.entitlement_id,
            "subscription_id": self.subscription_id,
            "period_start": self.period_start,
            "period_end": self.period_end,
            "event_count": self.event_count,
            "consumed": self.consumed,
            "last_timestamp": self.last_timestamp,
            "last_event_id": self.last_event_id,
            "charged": self.charged,
            "updated_at": now,
        }


def aggregate(
    meter: MeterSpec, total: MeterTotal, value: Decimal, timestamp: datetime, event_id: str
) -> tuple[Decimal, bool]:
    """The period's aggregate once an event (worth `value` units) is counted, and whether it is now the newest."""
    consumed = Decimal(total.consumed)
    if meter.aggregation in ("count", "sum"):
        try:
            return _EXACT.add(consumed, value), False
        except Inexact:
            raise AmountError(
                f"meter {meter.key!r}: the period's total would need more than {CONSUMED_LENGTH} digits"
            ) from None
    if meter.aggregation == "max":
        return max(consumed, value), False
    # last: the newest event by (timestamp, event_id) decides, whatever order they arrive in
    newest = total.last_timestamp is None or (timestamp, event_id) >= (total.last_timestamp, total.last_event_id or "")
    return (value if newest else consumed), newest


@dataclass
class _Batch:
    """What one transaction has locked and loaded: every event of the batch is computed against it, in memory."""

    catalogue: Catalogue
    now: datetime
    ledger: LedgerBatch
    entitlements: dict[str, tuple[str, int]]  # id -> (managed_by, precision)
    totals: dict[tuple[str, str, str], MeterTotal]
    meters: dict[str, list[MeterSpec]] = field(default_factory=dict)

    def meters_of(self, event_name: str) -> list[MeterSpec]:
        if event_name not in self.meters:
            self.meters[event_name] = meters_for(self.catalogue, event_name)
        return self.meters[event_name]

    def total(self, account: Account, meter: MeterSpec) -> MeterTotal:
        """The meter's aggregate for the balance's current period; an empty one on first use."""
        key = (account.customer_id, meter.key, period_key(account))
        total = self.totals.get(key)
        if total is None:
            total = self.totals[key] = MeterTotal(
                customer_id=account.customer_id,
                meter_key=meter.key,
                entitlement_id=meter.entitlement,
                period_key=key[2],
                subscription_id=account.subscription_id,
                period_start=account.period_start,
                period_end=account.period_end,
            )
        return total

    def checkpoint(self, customer_id: str, meters: Sequence[MeterSpec]) -> tuple[Checkpoint, dict[Any, MeterTotal]]:
        """The state an event with several meters returns to when one of them is refused."""
        accounts = [account for m in meters if (account := self.ledger.account(customer_id, m.entitlement)) is not None]
        totals = {}
        for meter in meters:
            account = self.ledger.account(customer_id, meter.entitlement)
            if account is not None:
                total = self.total(account, meter)
                totals[(customer_id, meter.key, total.period_key)] = replace(total)
        return self.ledger.checkpoint({account.id for account in accounts}), totals

    def rollback(self, saved: tuple[Checkpoint, dict[Any, MeterTotal]]) -> None:
        self.ledger.rollback(saved[0])
        self.totals.update(saved[1])


def _apply_meter(batch: _Batch, event: PendingEvent, meter: MeterSpec) -> None:
    """Deduct what the event adds to one meter. Nothing but an expiry is changed before a refusal can be raised."""
    entitlement = batch.entitlements.get(meter.entitlement)
    if entitlement is None:
        raise UsageRefused("no_balance", f"entitlement {meter.entitlement!r} of meter {meter.key!r} does not exist yet")
    managed_by, precision = entitlement
    if managed_by != "tally":
        raise UsageRefused("provider_managed", f"entitlement {meter.entitlement!r} is managed by {managed_by}")
    account = batch.ledger.account(event.customer_id, meter.entitlement)
    if account is None:
        raise UsageRefused("no_balance", f"customer {event.customer_id!r} has no balance in {meter.entitlement!r}")
    value = metered_value(meter, event.metadata)
    total = batch.total(account, meter)
    consumed, newest = aggregate(meter, total, value, event.timestamp, event.event_id)
    text = format_units(consumed)
    if len(text) > CONSUMED_LENGTH:  # never a row the database cannot take: that would fail the whole batch
        raise AmountError(f"meter {meter.key!r}: the period's total would need more than {CONSUMED_LENGTH} digits")
    target = credits_for(consumed, meter.units_per_credit, precision)
    charge = target - total.charged
    if charge > 0:
        source = Source(
            dedupe_key=f"usage:{event.event_id}:{meter.key}",
            usage_event_id=event.event_id,
            description=f"meter {meter.key}",
        )
        batch.ledger.deduct(account.id, charge, now=batch.now, source=source)
        total.charged = target
    if newest:
        total.last_timestamp, total.last_event_id = event.timestamp, event.event_id
    total.consumed = text
    total.event_count += 1
    total.changed = True


def _apply_event(batch: _Batch, event: PendingEvent) -> dict[str, Any]:
    """Apply one locked pending event whole, or say why it is refused: the event's mark."""
    mark: dict[str, Any] = {"id": event.id, "status": "applied", "refusal_code": None, "refusal_message": None}
    try:
        meters = batch.meters_of(event.event_name)
        if not meters:
            raise UsageRefused("unknown_meter", f"no meter counts events named {event.event_name!r}")
        if len(meters) == 1:
            _apply_meter(batch, event, meters[0])  # a refusal comes before any change (but an expiry, as in `deduct`)
        else:
            saved = batch.checkpoint(event.customer_id, meters)
            try:
                for meter in meters:
                    _apply_meter(batch, event, meter)
            except (LedgerError, AmountError):
                batch.rollback(saved)  # several meters: a refusal by one undoes the others
                raise
    except (LedgerError, AmountError) as refusal:
        mark.update(
            status="refused", refusal_code=getattr(refusal, "code", "invalid_amount"), refusal_message=str(refusal)
        )
    mark["applied_at"] = batch.now
    mark["last_error"] = None
    return mark


def _load_totals(session: Session, keys: set[tuple[str, str, str]]) -> dict[tuple[str, str, str], MeterTotal]:
    if not keys:
        return {}
    rows = session.execute(
        select(METER_USAGE).where(
            among(session, [METER_USAGE.c.customer_id, METER_USAGE.c.meter_key, METER_USAGE.c.period_key], keys)
        )
    ).all()
    return {
        (row.customer_id, row.meter_key, row.period_key): MeterTotal(
            customer_id=row.customer_id,
            meter_key=row.meter_key,
            entitlement_id=row.entitlement_id,
            period_key=row.period_key,
            subscription_id=row.subscription_id,
            period_start=row.period_start,
            period_end=row.period_end,
            event_count=row.event_count,
            consumed=row.consumed,
            last_timestamp=row.last_timestamp,
            last_event_id=row.last_event_id,
            charged=row.charged,
        )
        for row in rows
    }


def _claim(session: Session, ids: list[int], top_up: int) -> Sequence[PendingEvent]:
    """Lock the pending events among `ids`, and with `top_up` up to that many other pending events, oldest first.

    `SKIP LOCKED`: an event another transaction holds is left to it, so overlapping messages never wait on each
    other's events nor apply one twice. Topping up lets many small messages (single-event ingest calls) share
    one transaction; events that failed before (`attempts` > 0) are only taken by their own message.
    """
    columns = (
        USAGE_EVENTS.c.id,
        USAGE_EVENTS.c.event_id,
        USAGE_EVENTS.c.customer_id,
        USAGE_EVENTS.c.event_name,
        USAGE_EVENTS.c.timestamp,
        USAGE_EVENTS.c.metadata,
    )
    named = among(session, [USAGE_EVENTS.c.id], [(event_id,) for event_id in ids])
    pending = select(*columns).where(USAGE_EVENTS.c.status == "pending")
    events = list(session.execute(pending.where(named).with_for_update(skip_locked=True)).all())
    wanted = top_up + len(ids) - len(events)
    if top_up and events and wanted > 0:
        # Only a message that still had work tops up: one whose events others took (or applied) is done, and
        # looking further would walk the index's entries of events applied since the last vacuum for nothing.
        # Oldest first along ix_usage_events_status_received_at: the scan stops after `wanted` free rows.
        others = (
            pending.where(USAGE_EVENTS.c.attempts == 0, ~named)
            .order_by(USAGE_EVENTS.c.received_at)
            .limit(wanted)
            .with_for_update(skip_locked=True)
        )
        events += session.execute(others).all()
    return sorted(events, key=lambda event: event.id)


def _apply_batch(
    session: Session, catalogue: Catalogue, ids: list[int], now: datetime, *, top_up: int = 0, claimed: list[int]
) -> Counter[str]:
    """Apply the pending events among `ids` (and `top_up` more) in this transaction: six statements whatever
    their number. `claimed` receives the ids locked, before anything can fail."""
    events = _claim(session, ids, top_up)
    claimed.extend(event.id for event in events)
    if not events:
        return Counter()
    meters = {name: meters_for(catalogue, name) for name in {event.event_name for event in events}}
    wanted = {meter.entitlement for found in meters.values() for meter in found}
    entitlements = {
        row.id: (row.managed_by, row.precision)
        for row in session.execute(
            select(ENTITLEMENTS.c.id, ENTITLEMENTS.c.managed_by, ENTITLEMENTS.c.precision).where(
                ENTITLEMENTS.c.id.in_(sorted(wanted))
            )
        )
    }
    ledger = LedgerBatch.lock(
        session,
        {
            (event.customer_id, meter.entitlement)
            for event in events
            for meter in meters[event.event_name]
            if entitlements.get(meter.entitlement, ("",))[0] == "tally"
        },
    )
    totals = _load_totals(
        session,
        {
            (event.customer_id, meter.key, period_key(account))
            for event in events
            for meter in meters[event.event_name]
            if (account := ledger.account(event.customer_id, meter.entitlement)) is not None
        },
    )
    batch = _Batch(catalogue, now, ledger, entitlements, totals, meters)
    marks = [_apply_event(batch, event) for event in events]
    writes = Writes()
    ledger.write(writes)
    changed = [total.row(now) for total in batch.totals.values() if total.changed]
    writes.insert(METER_USAGE, changed, upsert_on=("customer_id", "meter_key", "period_key"))
    writes.update(USAGE_EVENTS, marks)
    writes.send(session)  # on PostgreSQL one statement for entries, balances, grants, aggregates and marks
    return Counter(mark["status"] for mark in marks)


def _connection_lost(error: Exception) -> bool:
    return isinstance(error, DBAPIError) and error.connection_invalidated


def _record_failure(db: Database, event_pk: int, error: Exception, *, max_attempts: int) -> str | None:
    """Count a failed attempt at one event, with its error, in a transaction of its own; dead-letter it at the last.

    "retry" while attempts remain, "failed" at the last; None when the event is no longer pending."""
    message = "".join(traceback.format_exception_only(error)).strip()[:MAX_ERROR_LENGTH]
    with db.write() as session:
        row = session.execute(
            select(USAGE_EVENTS.c.status, USAGE_EVENTS.c.attempts)
            .where(USAGE_EVENTS.c.id == event_pk)
            .with_for_update()
        ).first()
        if row is None or row.status != "pending":
            return None
        attempts = row.attempts + 1
        failed = attempts >= max_attempts
        session.execute(
            update(USAGE_EVENTS)
            .where(USAGE_EVENTS.c.id == event_pk)
            .values(attempts=attempts, last_error=message, status="failed" if failed else "pending")
        )
    return "failed" if failed else "retry"


@dataclass
class Outcome:
    """What a call decided: counts by outcome (applied, refused, failed: dead-lettered now, retry), and the
    events that failed this time and stay pending, to be tried again."""

    counts: Counter[str] = field(default_factory=Counter)
    retry: list[int] = field(default_factory=list)

    def __iadd__(self, other: Outcome) -> Outcome:
        self.counts += other.counts
        self.retry += other.retry
        return self


def _apply_isolating(
    db: Database, catalogue: Catalogue, ids: list[int], now: datetime | None, max_attempts: int, top_up: int
) -> Outcome:
    """The events in one transaction; if it fails, each half of what it held in its own, down to the event that
    fails alone, which is recorded. A refusal is not a failure: it never gets here."""
    claimed: list[int] = []
    try:
        with db.write() as session:
            return Outcome(_apply_batch(session, catalogue, ids, now or utcnow(), top_up=top_up, claimed=claimed))
    except Exception as error:
        if _connection_lost(error):
            raise  # nothing to isolate: the message is retried whole
        failure = error
    held = sorted(claimed) or ids
    if len(held) == 1:
        log.error("applying usage event %s failed", held[0], exc_info=failure)
        status = _record_failure(db, held[0], failure, max_attempts=max_attempts)
        return Outcome(Counter([status] if status else []), held if status == "retry" else [])
    log.warning("a batch of %d usage events failed (%s); applying it in halves", len(held), failure)
    middle = len(held) // 2
    outcome = _apply_isolating(db, catalogue, held[:middle], now, max_attempts, 0)
    outcome += _apply_isolating(db, catalogue, held[middle:], now, max_attempts, 0)
    return outcome


def apply_usage_events(
    db: Database,
    catalogue: Catalogue,
    ids: Iterable[int],
    *,
    now: datetime | None = None,
    chunk_size: int = CHUNK_SIZE,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    top_up: bool = False,
) -> Outcome:
    """Apply the pending events among `ids` (applied, refused or failed ones are skipped), `chunk_size` a
    transaction; with `top_up` (the worker), a chunk short of `chunk_size` is filled with other pending events."""
    ordered = sorted(set(ids))
    outcome = Outcome()
    for start in range(0, len(ordered), chunk_size):
        chunk = ordered[start : start + chunk_size]
        outcome += _apply_isolating(db, catalogue, chunk, now, max_attempts, chunk_size - len(chunk) if top_up else 0)
    return outcome


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
