"""The durable-row-then-doorbell pattern shared by webhook events and usage events.

A row in the database is the record; a broker message only says "there is work". Ringing never
raises (the broker may be down), and a sweep re-rings rows still pending after a while. Any table
with `id`, `status`, `received_at` and `last_enqueued_at` columns can use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

Work = TypeVar("Work")


def ring(enqueue: Callable[[Work], None], work: Work) -> bool:
    """Send the message; a broker outage is logged, not raised: the sweeper will ring again."""
    try:
        enqueue(work)
        return True
    except Exception:  # any broker client error: redis, pika, connection refused …
        log.warning("broker unavailable; %r waits for the sweeper", work, exc_info=True)
        return False


def claim_stale_pending(session: Session, model: Any, *, cutoff: datetime, now: datetime, limit: int) -> list[int]:
    """Ids of rows pending since before `cutoff` and not rung since; marked as rung `now`."""
    ids = list(
        session.execute(
            select(model.id)
            .where(
                model.status == "pending",
                model.received_at <= cutoff,
                or_(model.last_enqueued_at.is_(None), model.last_enqueued_at <= cutoff),
            )
            .order_by(model.id)
            .limit(limit)
        ).scalars()
    )
    if ids:
        session.execute(update(model).where(model.id.in_(ids)).values(last_enqueued_at=now))
    return ids
