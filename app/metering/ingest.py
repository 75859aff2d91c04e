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
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalogue import Catalogue, MeterSpec
from app.db import Database, insert_ignoring_conflicts_statement
from app.errors import ApiError
from app.ledger.amounts import AmountError, parse_decimal
from app.metering.models import UsageEvent
from app.models import Customer

MAX_EVENTS = 1000
MAX_ID_LENGTH = 255
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_LENGTH = 100
MAX_METADATA_VALUE_LENGTH = 500
OLDEST_TIMESTAMP = timedelta(hours=1)
"""Dodo refuses events older than an hour: past that an event may belong to a period already closed."""
FUTURE_TOLERANCE = timedelta(minutes=5)


def meters_for(catalogue: Catalogue, event_name: str) -> list[MeterSpec]:
    """The meters that count events of this name, in a stable order."""
    return sorted(
        (meter for meter in catalogue.meters.values() if meter.event_name == event_name), key=lambda meter: meter.key
    )


def metered_value(meter: MeterSpec, metadata: dict[str, Any] | None) -> Decimal:
    """The units one event contributes to a meter: 1 for count, else the metadata value under its key.

    JSON numbers arrive as floats; `Decimal(repr(x))` is the shortest decimal that reads back as the
    same float, which is the literal the client wrote for any value with up to 15 significant digits.
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
    if value.adjusted() > 30:
        raise AmountError(f"metadata.{meter.metadata_key} is too large")
    return value


@dataclass(frozen=True)
class NewEvent:
    event_id: str
    customer_id: str
    event_name: str
    timestamp: datetime
    metadata: dict[str, Any] | None


def _text(event: dict[str, Any], name: str, where: str) -> str:
    value = event.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, "invalid_event", f"{where}.{name} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise ApiError(422, "invalid_event", f"{where}.{name} must be at most {MAX_ID_LENGTH} characters")
    return value


def _timestamp(raw: Any, where: str, now: datetime) -> datetime:
    if raw is None:
        return now
    if not isinstance(raw, str):
        raise ApiError(422, "invalid_event", f"{where}.timestamp must be an ISO 8601 string")
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(422, "invalid_event", f"{where}.timestamp {raw!r} is not an ISO 8601 date-time") from None
    moment = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    if moment < now - OLDEST_TIMESTAMP or moment > now + FUTURE_TOLERANCE:
        raise ApiError(
            422, "invalid_event", f"{where}.timestamp must be within the last hour and at most 5 minutes ahead"
        )
    return moment


def _metadata(raw: Any, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ApiError(422, "invalid_event", f"{where}.metadata must be an object")
    if len(raw) > MAX_METADATA_KEYS:
        raise ApiError(422, "invalid_event", f"{where}.metadata may hold at most {MAX_METADATA_KEYS} keys")
    for key, value in raw.items():
        if len(key) > MAX_METADATA_KEY_LENGTH:
            raise ApiError(
                422, "invalid_event", f"{where}.metadata keys must be at most {MAX_METADATA_KEY_LENGTH} characters"
            )
        if not isinstance(value, (str, int, float, bool)):
            raise ApiError(422, "invalid_event", f"{where}.metadata.{key} must be a string, number or boolean")
        if isinstance(value, str) and len(value) > MAX_METADATA_VALUE_LENGTH:
            raise ApiError(
                422, "invalid_event", f"{where}.metadata.{key} must be at most {MAX_METADATA_VALUE_LENGTH} characters"
            )
    return raw


def parse_batch(payload: Any, catalogue: Catalogue, now: datetime) -> list[NewEvent]:
    """Validate the whole batch; the first problem found refuses it with a message naming the event."""
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        raise ApiError(422, "invalid_request", 'the body must be {"events": [...]}')
    raw_events = payload["events"]
    if len(raw_events) > MAX_EVENTS:
        raise ApiError(422, "too_many_events", f"at most {MAX_EVENTS} events per request, got {len(raw_events)}")
    events: list[NewEvent] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_events):
        where = f"events[{index}]"
        if not isinstance(raw, dict):
            raise ApiError(422, "invalid_event", f"{where} must be an object")
        event_id = _text(raw, "event_id", where)
        if event_id in seen:
            raise ApiError(422, "duplicate_event_id", f"{where}.event_id {event_id!r} appears twice in this request")
        seen.add(event_id)
        event_name = _text(raw, "event_name", where)
        metadata = _metadata(raw.get("metadata"), where)
        meters = meters_for(catalogue, event_name)
        if not meters:
            raise ApiError(422, "unknown_meter", f"{where}: no meter counts events named {event_name!r}")
        for meter in meters:
            try:
                metered_value(meter, metadata)
            except AmountError as error:
                raise ApiError(422, "invalid_amount", f"{where}: {error}") from None
        events.append(
            NewEvent(
                event_id=event_id,
                customer_id=_text(raw, "customer_id", where),
                event_name=event_name,
                timestamp=_timestamp(raw.get("timestamp"), where, now),
                metadata=metadata,
            )
        )
    return events


def _check_customers(session: Session, events: list[NewEvent]) -> None:
    wanted = {event.customer_id for event in events}
    known = set(session.execute(select(Customer.id).where(Customer.id.in_(wanted))).scalars()) if wanted else set()
    unknown = sorted(wanted - known)
    if unknown:
        shown = ", ".join(repr(customer) for customer in unknown[:5])
        raise ApiError(422, "unknown_customer", f"unknown customer(s): {shown}{' …' if len(unknown) > 5 else ''}")


def store_batch(db: Database, events: list[NewEvent], now: datetime) -> list[int]:
    """Insert the events that are new (ON CONFLICT DO NOTHING on event_id); the ids of those inserted."""
    if not events:
        return []
    rows = [
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
    with db.write() as session:
        _check_customers(session, events)
        statement = insert_ignoring_conflicts_statement(session, UsageEvent.__table__)
        return list(session.execute(statement.returning(UsageEvent.__table__.c.id), rows).scalars())
