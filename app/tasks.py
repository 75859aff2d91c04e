"""The jobs the workers run, and the clock that schedules the periodic ones.

Actors are declared on a broker given to `declare_jobs`, never at import time, so any process
(the web app, `tally worker`, `tally clock`, a test) builds its own from its own settings. Each
actor is thin: it calls one domain function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import dramatiq
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from dramatiq.broker import Broker

from app.config import Settings
from app.db import Database
from app.doorbell import ring
from app.inbox import processing, store
from app.ledger.service import expire_all_due
from app.metering import service as metering
from app.reconciliation import service as reconciliation
from app.times import utcnow

EVENTS_QUEUE = "tally-events"
USAGE_QUEUE = "tally-usage"
MAINTENANCE_QUEUE = "tally-maintenance"


@dataclass(frozen=True)
class Jobs:
    """The actors declared on one broker, and the doorbells that send to them."""

    broker: Broker
    apply_inbox_events: dramatiq.Actor[[list[int]], None]
    apply_usage_events: dramatiq.Actor[[list[int]], None]
    sweep_inbox: dramatiq.Actor[[], None]
    sweep_usage_events: dramatiq.Actor[[], None]
    expire_periods: dramatiq.Actor[[], None]
    reconcile_nightly: dramatiq.Actor[[str], None]

    def enqueue_events(self, inbox_event_ids: list[int]) -> None:
        """The doorbell for stored inbox events: one message for a batch."""
        self.broker.enqueue(self.apply_inbox_events.message(inbox_event_ids))

    def enqueue_event(self, inbox_event_id: int) -> None:
        self.enqueue_events([inbox_event_id])

    def enqueue_usage(self, usage_event_ids: list[int], delay_ms: int | None = None) -> None:
        """The doorbell for newly stored usage events: one message per ingest batch."""
        self.broker.enqueue(self.apply_usage_events.message(usage_event_ids), delay=delay_ms)


def declare_jobs(broker: Broker, settings: Settings, db: Database) -> Jobs:
    """Declare every actor on `broker`; the actors use `settings` and `db`."""
    retries: dict[str, Any] = {
        # Tally counts attempts in the row and dead-letters there; the broker only spaces the retries.
        "max_retries": settings.max_attempts,
        "min_backoff": settings.retry_min_backoff_ms,
        "max_backoff": settings.retry_max_backoff_ms,
    }
    sweep_after = timedelta(seconds=settings.sweep_after_seconds)
    jobs: Jobs

    def apply_inbox_events(inbox_event_ids: list[int]) -> None:
        """One transaction for the batch; a failed event retries the message (the applied ones are no-ops)."""
        outcome = processing.apply_events(db, settings.catalogue, inbox_event_ids, max_attempts=settings.max_attempts)
        if outcome.retry:
            raise processing.RetryableFailure(f"inbox events {outcome.retry} will be retried")

    def apply_usage_events(usage_event_ids: list[int]) -> None:
        """Refusals are recorded on the events. An event that fails is isolated and counted: one of this message's
        is retried with the message (the rest are applied already, so for them a retry is a no-op); one the
        worker took on top of the message is rung again in a message of its own, after the retry backoff."""
        outcome = metering.apply_usage_events(
            db, settings.catalogue, usage_event_ids, max_attempts=settings.max_attempts, top_up=True
        )
        foreign = sorted(set(outcome.retry) - set(usage_event_ids))
        if foreign:
            ring(lambda ids: jobs.enqueue_usage(ids, delay_ms=settings.retry_min_backoff_ms), foreign)
        if len(foreign) < len(outcome.retry):
            raise processing.RetryableFailure(
                f"usage events {sorted(set(outcome.retry) - set(foreign))} will be retried"
            )

    def sweep_inbox() -> None:
        store.sweep(db, jobs.enqueue_event, older_than=sweep_after)

    def sweep_usage_events() -> None:
        metering.sweep_usage_events(db, jobs.enqueue_usage, older_than=sweep_after)

    def expire_periods() -> None:
        with db.write() as session:
            expire_all_due(session)

    def reconcile_nightly(date: str) -> None:
        """The nightly run for `date`: its (provider, date) row makes a second delivery a no-op."""
        reconciliation.reconcile_scheduled(db, settings, date)

    def declare(fn: Callable[..., None], queue: str, **options: Any) -> Any:
        return dramatiq.actor(broker=broker, actor_name=fn.__name__, queue_name=queue, **options)(fn)

    jobs = Jobs(
        broker=broker,
        apply_inbox_events=declare(apply_inbox_events, EVENTS_QUEUE, **retries),
        apply_usage_events=declare(apply_usage_events, USAGE_QUEUE, **retries),
        sweep_inbox=declare(sweep_inbox, MAINTENANCE_QUEUE, max_retries=0),
        sweep_usage_events=declare(sweep_usage_events, MAINTENANCE_QUEUE, max_retries=0),
        expire_periods=declare(expire_periods, MAINTENANCE_QUEUE, max_retries=3),
        # A long job (50,000 objects at the rate limit take minutes): no retry, the row says how it ended.
        reconcile_nightly=declare(reconcile_nightly, MAINTENANCE_QUEUE, max_retries=0, time_limit=6 * 3600 * 1000),
    )
    return jobs


def schedule(scheduler: BaseScheduler, jobs: Jobs, reconcile_at: str = "03:00") -> BaseScheduler:
    """The clock's timetable. It does no work itself: it sends messages, and workers do the work."""
    hour, minute = (int(part) for part in reconcile_at.split(":"))

    def send_reconcile() -> None:
        jobs.reconcile_nightly.send(utcnow().date().isoformat())

    scheduler.add_job(
        send_reconcile, "cron", hour=hour, minute=minute, id="reconcile", coalesce=True, misfire_grace_time=3600
    )
    scheduler.add_job(jobs.sweep_inbox.send, "interval", seconds=30, id="sweep-inbox", coalesce=True)
    scheduler.add_job(jobs.expire_periods.send, "interval", seconds=60, id="expire-periods", coalesce=True)
    scheduler.add_job(jobs.sweep_usage_events.send, "interval", seconds=30, id="sweep-usage", coalesce=True)
    return scheduler


def run_clock(jobs: Jobs, reconcile_at: str = "03:00") -> None:
    """The `clock` process."""
    schedule(BlockingScheduler(timezone="UTC"), jobs, reconcile_at).start()


def start_clock_in_background(jobs: Jobs, reconcile_at: str = "03:00") -> BaseScheduler:
    """The clock inside `tally serve` on the embedded default."""
    scheduler = schedule(BackgroundScheduler(timezone="UTC", daemon=True), jobs, reconcile_at)
    scheduler.start()
    return scheduler
