"""The Dramatiq actors. They are thin: each calls one service function of `app`."""

from __future__ import annotations

from datetime import timedelta

import dramatiq
from dramatiq.broker import Broker

from app.config import get_settings
from app.db import get_database
from app.inbox import processing, store
from app.ledger.service import expire_all_due
from workers.broker import configure_broker

settings = get_settings()
broker = configure_broker(settings)

EVENTS_QUEUE = "tally-events"
MAINTENANCE_QUEUE = "tally-maintenance"


@dramatiq.actor(
    queue_name=EVENTS_QUEUE,
    # Tally counts attempts in the inbox row and dead-letters there; the broker just spaces the retries.
    max_retries=settings.max_attempts,
    min_backoff=settings.retry_min_backoff_ms,
    max_backoff=settings.retry_max_backoff_ms,
)
def apply_inbox_event(inbox_event_id: int) -> None:
    processing.apply_event(get_database(), settings.catalogue, inbox_event_id, max_attempts=settings.max_attempts)


@dramatiq.actor(queue_name=MAINTENANCE_QUEUE, max_retries=0)
def sweep_inbox() -> None:
    store.sweep(get_database(), enqueue, older_than=timedelta(seconds=settings.sweep_after_seconds))


@dramatiq.actor(queue_name=MAINTENANCE_QUEUE, max_retries=3)
def expire_periods() -> None:
    with get_database().write() as session:
        expire_all_due(session)


def enqueue(inbox_event_id: int, via: Broker | None = None) -> None:
    """Send the doorbell for one inbox event (on another broker when `via` is given, as tests do)."""
    (via or broker).enqueue(apply_inbox_event.message(inbox_event_id))


# --- usage metering ------------------------------------------------------------------------------

USAGE_QUEUE = "tally-usage"


@dramatiq.actor(queue_name=USAGE_QUEUE, max_retries=settings.max_attempts,
                min_backoff=settings.retry_min_backoff_ms, max_backoff=settings.retry_max_backoff_ms)
def apply_usage_events(usage_event_ids: list[int]) -> None:
    """Apply stored usage events; refusals are recorded on the events, other errors retry."""
    from app.metering.service import apply_usage_events as apply

    apply(get_database(), settings.catalogue, usage_event_ids)


@dramatiq.actor(queue_name=MAINTENANCE_QUEUE, max_retries=0)
def sweep_usage_events() -> None:
    from app.metering.service import sweep_usage_events as sweep

    sweep(get_database(), enqueue_usage, older_than=timedelta(seconds=settings.sweep_after_seconds))


def enqueue_usage(usage_event_ids: list[int], via: Broker | None = None) -> None:
    """The doorbell for newly stored usage events: one message per ingest batch."""
    (via or broker).enqueue(apply_usage_events.message(usage_event_ids))
