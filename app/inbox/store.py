"""Storing events, and handing them to the workers after the commit.

The inbox row is the durable record; a broker message is only a doorbell (`app.doorbell`). So a webhook is committed
first and enqueued second: if the broker is down the event waits and the sweeper rings again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from app.db import Database, insert_ignoring_conflicts, utcnow
from app.doorbell import claim_stale_pending, ring
from app.models import InboxEvent

Enqueue = Callable[[int], None]


def store_event(db: Database, *, provider: str, event_id: str, event_type: str, body: str) -> int | None:
    """Insert the event; its id when it is new, None when it is a duplicate delivery."""
    with db.write() as session:
        inserted = insert_ignoring_conflicts(
            session,
            InboxEvent,
            {
                "provider": provider,
                "provider_event_id": event_id,
                "type": event_type,
                "body": body,
                "received_at": utcnow(),
            },
        )
        return None if inserted is None else int(inserted[0])


def receive_event(
    db: Database, enqueue: Enqueue, *, provider: str, event_id: str, event_type: str, body: str
) -> int | None:
    """Store, commit, then ring: the webhook path in one call (one hop off the event loop)."""
    inbox_event_id = store_event(db, provider=provider, event_id=event_id, event_type=event_type, body=body)
    if inbox_event_id is not None:
        ring(enqueue, inbox_event_id)
    return inbox_event_id


def sweep(
    db: Database, enqueue: Enqueue, *, older_than: timedelta, now: datetime | None = None, limit: int = 500
) -> int:
    """Enqueue pending events that no worker has picked up within `older_than` (lost message, crash)."""
    now = now or utcnow()
    with db.write() as session:
        ids = claim_stale_pending(session, InboxEvent, cutoff=now - older_than, now=now, limit=limit)
    return sum(ring(enqueue, inbox_event_id) for inbox_event_id in ids)


def replay(db: Database, enqueue: Enqueue, inbox_event_id: int) -> bool:
    """Send a failed event through again once its cause is fixed."""
    with db.write() as session:
        event = session.get(InboxEvent, inbox_event_id, with_for_update=True)
        if event is None or event.status != "failed":
            return False
        event.status, event.attempts, event.last_error = "pending", 0, None
    ring(enqueue, inbox_event_id)
    return True
