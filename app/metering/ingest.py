"""`POST /events/ingest`: validate a batch of usage events whole, store the new ones, report how many.

The shape is Dodo's (`{events: [{event_id, customer_id, event_name, timestamp?, metadata?}]}`, at most
1000, idempotent on `event_id`). A batch is all or nothing: one bad event (unknown customer, no meter
for its name, a metered value that is not a non-negative number, a duplicate `event_id` inside the
batch, a timestamp outside Dodo's window) refuses the batch with a 4xx and stores nothing. Events are
committed before the answer; workers apply them (app.metering.service).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sqlalchemy import select

from app.catalogue import Catalogue, MeterSpec
from app.db import AsyncDatabase, Database, insert_ignoring_conflicts_statement, table_of
from app.errors import InvalidInput
from app.ledger.amounts import AmountError, parse_decimal
from app.metering.models import UsageEvent
from app.models import Customer
from app.validation import Identifier, Instant, Scalar, Text, problem

MAX_EVENTS = 1000
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_LENGTH = 100
MAX_METADATA_VALUE_LENGTH = 500
OLDEST_TIMESTAMP = timedelta(hours=1)
"""Dodo refuses events older than an hour: past that an event may belong to a period already closed."""
FUTURE_TOLERANCE = timedelta(minutes=5)


class IngestRejected(InvalidInput):
    """A batch refused whole: nothing of it is stored."""

    code = "invalid_event"

    def __init__(self, *, code: str, message: str) -> None:
        super().__init__(message, code=code)


def meters_for(catalogue: Catalogue, event_name: str) -> list[MeterSpec]:
    """The meters that count events of this name, in a stable order."""
    return sorted(
        (meter for meter in catalogue.meters.values() if meter.event_name == event_name), key=lambda meter: meter.key
    )


UNIT_PLACES = 20
"""The meters' precision: units are counted exactly to this many decimal places, so that a period's
aggregate stays exact text that fits its column (`meter_usage.consumed`, 80 characters)."""
MAX_UNIT_DIGITS = 31
"""Digits before the point a metered value may have (below 10**31)."""


def decimal_places(value: Decimal) -> int:
    """The places `value` needs to be written exactly (trailing zeros need none), without ever formatting it:
    `1E-999999999` is answered at once."""
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # a finite value
    significant = "".join(map(str, digits)).rstrip("0")
    return max(0, -(exponent + len(digits) - len(significant))) if significant else 0


def metered_value(meter: MeterSpec, metadata: dict[str, Any] | None) -> Decimal:
    """The units one event contributes to a meter: 1 for count, else the metadata value under its key.

    JSON numbers arrive as floats; `Decimal(repr(x))` is the shortest decimal that reads back as the
    same float, which is the literal the client wrote for any value with up to 15 significant digits.
    A value finer than the meters' precision (`UNIT_PLACES`) is refused rather than rounded: `1e-100`
    tokens cannot be counted exactly, and its aggregate could not be stored.
    """
    if meter.aggregation == "count":
        return Decimal(1)
    assert meter.metadata_key is not None
    raw = (metadata or {}).get(meter.metadata_key)
    if raw is None:
        raise AmountError(f"metadata.{meter.metadata_key} is required by meter {meter.key!r}")
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise AmountError(f"metadata.{meter.metadata_key} must be a finite number")
        raw = repr(raw)
    value = parse_decimal(raw)
    if value < 0:
        raise AmountError(f"metadata.{meter.metadata_key} must not be negative, got {value}")
    if value.adjusted() >= MAX_UNIT_DIGITS:
        raise AmountError(f"metadata.{meter.metadata_key} is too large")
    if decimal_places(value) > UNIT_PLACES:
        raise AmountError(
            f"metadata.{meter.metadata_key} has more than {UNIT_PLACES} decimal places: "
            f"meters count units exactly to {UNIT_PLACES} places"
        )
    return value


@dataclass(frozen=True)
class NewEvent:
    event_id: str
    customer_id: str
    event_name: str
    timestamp: datetime
    metadata: dict[str, Any] | None


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_METADATA_VALUE_LENGTH:
        raise ValueError(f"must be at most {MAX_METADATA_VALUE_LENGTH} characters")
    return value


Metadata = Annotated[
    dict[Annotated[Text, Field(max_length=MAX_METADATA_KEY_LENGTH)], Annotated[Scalar, AfterValidator(_short)]],
    Field(max_length=MAX_METADATA_KEYS),
]


class IngestedEvent(BaseModel):
    """One event as Dodo's ingest API takes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: Identifier
    customer_id: Identifier
    event_name: Identifier
    timestamp: Instant | None = None
    metadata: Metadata | None = None


INGESTED_EVENTS = TypeAdapter(list[IngestedEvent])
"""The whole list in one call: the per-event loop stays in pydantic's core."""


def parse_batch(payload: Any, catalogue: Catalogue, now: datetime) -> list[NewEvent]:
    """Validate the whole batch; the first problem found refuses it with a message naming the event."""
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        raise IngestRejected(code="invalid_request", message='the body must be {"events": [...]}')
    raw_events = payload["events"]
    if len(raw_events) > MAX_EVENTS:
        raise IngestRejected(
            code="too_many_events", message=f"at most {MAX_EVENTS} events per request, got {len(raw_events)}"
        )
    try:
        parsed = INGESTED_EVENTS.validate_python(raw_events)
    except ValidationError as error:
        raise IngestRejected(code="invalid_event", message=problem(error, "events")) from None
    events: list[NewEvent] = []
    seen: set[str] = set()
    for index, event in enumerate(parsed):
        where = f"events[{index}]"
        if event.timestamp is not None and not now - OLDEST_TIMESTAMP <= event.timestamp <= now + FUTURE_TOLERANCE:
            raise IngestRejected(
                code="invalid_event",
                message=f"{where}.timestamp must be within the last hour and at most 5 minutes ahead",
            )
        if event.event_id in seen:
            raise IngestRejected(
                code="duplicate_event_id", message=f"{where}.event_id {event.event_id!r} appears twice in this request"
            )
        seen.add(event.event_id)
        meters = meters_for(catalogue, event.event_name)
        if not meters:
            raise IngestRejected(
                code="unknown_meter", message=f"{where}: no meter counts events named {event.event_name!r}"
            )
        for meter in meters:
            try:
                metered_value(meter, event.metadata)
            except AmountError as error:
                raise IngestRejected(code="invalid_amount", message=f"{where}: {error}") from None
        events.append(
            NewEvent(
                event_id=event.event_id,
                customer_id=event.customer_id,
                event_name=event.event_name,
                timestamp=event.timestamp or now,
                metadata=event.metadata,
            )
        )
    return events


def _refuse_unknown(wanted: set[str], known: set[str]) -> None:
    unknown = sorted(wanted - known)
    if unknown:
        shown = ", ".join(repr(customer) for customer in unknown[:5])
        more = " …" if len(unknown) > 5 else ""
        raise IngestRejected(code="unknown_customer", message=f"unknown customer(s): {shown}{more}")


def rows_for(events: list[NewEvent], now: datetime) -> list[dict[str, Any]]:
    """The `usage_events` rows of a validated batch."""
    return [
        {
            "event_id": event.event_id,
            "customer_id": event.customer_id,
            "event_name": event.event_name,
            "timestamp": event.timestamp,
            "metadata": event.metadata,
            "received_at": now,
            "status": "pending",
            "last_enqueued_at": now,
        }
        for event in events
    ]


def store_batch(db: Database, events: list[NewEvent], now: datetime) -> list[int]:
    """Insert the events that are new (ON CONFLICT DO NOTHING on event_id); the ids of those inserted."""
    if not events:
        return []
    with db.write() as session:
        wanted = {event.customer_id for event in events}
        _refuse_unknown(wanted, set(session.execute(select(Customer.id).where(Customer.id.in_(wanted))).scalars()))
        statement = insert_ignoring_conflicts_statement(session, UsageEvent)
        return list(session.execute(statement.returning(table_of(UsageEvent).c.id), rows_for(events, now)).scalars())


async def check_customers(db: AsyncDatabase, events: list[NewEvent]) -> None:
    """Refuse the batch when it names a customer Tally does not know (customers are never deleted,
    so checking before the group-committed insert is as good as checking inside it)."""
    wanted = {event.customer_id for event in events}
    if not wanted:
        return
    async with db.read() as connection:
        known = set((await connection.execute(select(Customer.id).where(Customer.id.in_(wanted)))).scalars())
    _refuse_unknown(wanted, known)
