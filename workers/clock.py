"""The `clock` process: schedules maintenance actors. It does no work itself; workers do."""

from __future__ import annotations

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler


def schedule(scheduler: BaseScheduler) -> BaseScheduler:
    from workers import actors

    scheduler.add_job(actors.sweep_inbox.send, "interval", seconds=30, id="sweep-inbox", coalesce=True)
    scheduler.add_job(actors.expire_periods.send, "interval", seconds=60, id="expire-periods", coalesce=True)
    scheduler.add_job(actors.sweep_usage_events.send, "interval", seconds=30, id="sweep-usage", coalesce=True)
    return scheduler


def run_forever() -> None:
    schedule(BlockingScheduler(timezone="UTC")).start()


def start_in_background() -> BaseScheduler:
    scheduler = schedule(BackgroundScheduler(timezone="UTC", daemon=True))
    scheduler.start()
    return scheduler
