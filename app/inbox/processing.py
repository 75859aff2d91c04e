"""Applying one inbox event: the domain changes and the event's mark commit together or not at all."""

from __future__ import annotations

import json
import logging
import traceback

from prometheus_client import Counter
from sqlalchemy import select

from app.catalogue import Catalogue
from app.db import Database, utcnow
from app.errors import PayloadError
from app.models import InboxEvent
from app.providers.base import EventHandler, HandlerContext
from app.providers.dodo.handlers import handle as handle_dodo
from app.providers.stripe.handlers import handle as handle_stripe

log = logging.getLogger(__name__)

HANDLERS: dict[str, EventHandler] = {"stripe": handle_stripe}
HANDLERS["dodo"] = handle_dodo

EVENTS_APPLIED = Counter("tally_events_applied_total", "Inbox events finished, by outcome", ["provider", "status"])
EVENT_FAILURES = Counter("tally_event_failures_total", "Failed attempts at applying an inbox event", ["provider"])


class RetryableFailure(Exception):
    """Raised so that the broker retries the event with backoff."""


def apply_event(db: Database, catalogue: Catalogue, inbox_event_id: int, *, max_attempts: int) -> str:
    """Apply the event once; return its status. Raises RetryableFailure when it should be tried again."""
    try:
        with db.write() as session:
            event = session.execute(
                select(InboxEvent).where(InboxEvent.id == inbox_event_id).with_for_update()
            ).scalar_one_or_none()
            if event is None:
                return "missing"
            if event.status != "pending":
                return event.status  # already applied, skipped, or dead-lettered: a redelivery is a no-op
            try:
                payload = json.loads(event.body)
                if not isinstance(payload, dict):
                    raise PayloadError("the event body is not a JSON object")
            except ValueError as error:
                raise PayloadError(f"the event body is not JSON: {error}") from None
            handler = HANDLERS.get(event.provider)
            handled = handler is not None and handler(
                session, event, payload, HandlerContext(catalogue=catalogue, now=utcnow())
            )
            event.status = "processed" if handled else "skipped"
            event.attempts += 1
            event.processed_at = utcnow()
            event.last_error = None
            provider, status = event.provider, event.status
        EVENTS_APPLIED.labels(provider, status).inc()
        return status
    except PayloadError as error:
        return _record_failure(db, inbox_event_id, f"malformed payload: {error}", final=True)
    except Exception as error:
        log.exception("applying inbox event %s failed", inbox_event_id)
        status = _record_failure(
            db, inbox_event_id, "".join(traceback.format_exception_only(error)).strip(), max_attempts=max_attempts
        )
        if status == "failed":
            return status
        raise RetryableFailure(f"inbox event {inbox_event_id}: {error}") from error


def _record_failure(
    db: Database, inbox_event_id: int, message: str, *, final: bool = False, max_attempts: int = 1
) -> str:
    """Count the attempt in its own transaction; dead-letter the event when it is final."""
    with db.write() as session:
        event = session.get(InboxEvent, inbox_event_id, with_for_update=True)
        if event is None or event.status != "pending":
            return event.status if event else "missing"
        event.attempts += 1
        event.last_error = message[:4000]
        if final or event.attempts >= max_attempts:
            event.status = "failed"
        provider, status = event.provider, event.status
    EVENT_FAILURES.labels(provider).inc()
    if status == "failed":
        EVENTS_APPLIED.labels(provider, "failed").inc()
    return status
