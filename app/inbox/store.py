"""Storing events, and handing them to the workers after the commit.

The inbox row is the durable record; a broker message is only a doorbell. So a webhook is committed
first and enqueued second: if the broker is down the event waits and the sweeper rings again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update

from app.db import Database, insert_ignoring_conflicts, utcnow
from app.models import InboxEvent

log = logging.getLogger(__name__)

Enqueue = Callable[[int], None]


def store_event(db: Database, *, provider: str, event_id: str, event_type: str, body: str) -> int | None:
    """Insert the event; its id when it is new, None when it is a duplicate delivery."""
    with db.write() as session:
        inserted = insert_ignoring_conflicts(session, InboxEvent.__table__, {
            "provider": provider, "provider_event_id": event_id, "type": event_type, "body": body,
            "received_at": utcnow(),
        })
        return None if inserted is None else int(inserted[0])


def receive_event(db: Database, enqueue: Enqueue, *, provider: str, event_id: str, event_type: str,
                  body: str) -> int | None:
    """Store, commit, then ring: the webhook path in one call (one hop off the event loop)."""
    inbox_event_id = store_event(db, provider=provider, event_id=event_id, event_type=event_type, body=body)
    if inbox_event_id is not None:
        try_enqueue(enqueue, inbox_event_id)
    return inbox_event_id


def try_enqueue(enqueue: Enqueue, inbox_event_id: int) -> bool:
    """Ring the doorbell; a broker outage is logged, not raised: the sweeper will ring again."""
    try:
        enqueue(inbox_event_id)
        return True
    except Exception:  # any broker client error: redis, pika, connection refused …
        log.warning("broker unavailable; inbox event %s waits for the sweeper", inbox_event_id, exc_info=True)
        return False


def sweep(db: Database, enqueue: Enqueue, *, older_than: timedelta, now: datetime | None = None, limit: int = 500) -> int:
    """Enqueue pending events that no worker has picked up within `older_than` (lost message, crash)."""
    now = now or utcnow()
    cutoff = now - older_than
    with db.write() as session:
        ids = session.execute(
            select(InboxEvent.id)
            .where(InboxEvent.status == "pending", InboxEvent.received_at <= cutoff,
                   or_(InboxEvent.last_enqueued_at.is_(None), InboxEvent.last_enqueued_at <= cutoff))
            .order_by(InboxEvent.id).limit(limit)
        ).scalars().all()
        if ids:
            session.execute(update(InboxEvent).where(InboxEvent.id.in_(ids)).values(last_enqueued_at=now))
    return sum(try_enqueue(enqueue, inbox_event_id) for inbox_event_id in ids)


def replay(db: Database, enqueue: Enqueue, inbox_event_id: int) -> bool:
    """Send a failed event through again once its cause is fixed."""
    with db.write() as session:
        event = session.get(InboxEvent, inbox_event_id, with_for_update=True)
        if event is None or event.status != "failed":
            return False
        event.status, event.attempts, event.last_error = "pending", 0, None
    try_enqueue(enqueue, inbox_event_id)
    return True
