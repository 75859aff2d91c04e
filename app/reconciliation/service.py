"""Running reconciliation: one stored run per provider, manual or scheduled.

A provider without an API key is skipped with a line that says so. A scheduled run first inserts its
(provider, date) row, unique in the database, so it happens once however many clocks fire or however
often the message is delivered; a manual run is always allowed. A run that cannot finish (the
provider stays down, refuses the key) is stored as failed with its counts so far and the error;
every object's repair was its own transaction, so nothing is left half-applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.config import Settings
from app.db import Database
from app.reconciliation import dodo, stripe
from app.reconciliation.context import RunContext
from app.reconciliation.limits import ApiCaller, RateLimiter, RetryPolicy
from app.reconciliation.runs import Recorder, start_run

log = logging.getLogger(__name__)

PROVIDERS = ("stripe", "dodo")
KEY_VARIABLES = {"stripe": "STRIPE_API_KEY", "dodo": "DODO_PAYMENTS_API_KEY"}


@dataclass
class Outcome:
    """What `reconcile` did: the runs it stored, and lines about providers it did not run."""

    run_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: bool = False


def _api_key(settings: Settings, provider: str) -> str | None:
    return settings.stripe_api_key if provider == "stripe" else settings.dodo_api_key


def _runner(settings: Settings, provider: str, key: str) -> tuple[Callable[[RunContext], None], Any]:
    if provider == "stripe":
        client = stripe.client_for(key, settings.stripe_api_base)
        return (lambda ctx: stripe.reconcile(ctx, client)), stripe.classify
    dodo_client = dodo.client_for(key, settings.dodo_base_url)
    return (lambda ctx: dodo.reconcile(ctx, dodo_client)), dodo.classify


def reconcile(
    db: Database,
    settings: Settings,
    *,
    providers: Sequence[str] = PROVIDERS,
    dry_run: bool = False,
    since: datetime | None = None,
    scheduled_for: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Outcome:
    outcome = Outcome()
    for provider in providers:
        key = _api_key(settings, provider)
        if not key:
            outcome.notes.append(f"{provider}: skipped, {KEY_VARIABLES[provider]} is not set")
            continue
        run_id = start_run(db, provider, dry_run=dry_run, scheduled_for=scheduled_for, since=since)
        if run_id is None:
            outcome.notes.append(f"{provider}: the scheduled run for {scheduled_for} has already run")
            continue
        outcome.run_ids.append(run_id)
        if not run_one(db, settings, provider, key, run_id, dry_run=dry_run, since=since, progress=progress):
            outcome.failed = True
    return outcome


def run_one(
    db: Database,
    settings: Settings,
    provider: str,
    key: str,
    run_id: int,
    *,
    dry_run: bool,
    since: datetime | None,
    progress: Callable[[str], None] | None = None,
) -> bool:
    """Run one stored run to its end; True when it succeeded."""
    recorder = Recorder(db, run_id, provider, dry_run)
    runner, classify = _runner(settings, provider, key)
    caller = ApiCaller(
        provider,
        classify,
        limiter=RateLimiter(settings.reconcile_rate),
        policy=RetryPolicy(
            max_retries=settings.reconcile_retries, backoff_seconds=settings.reconcile_backoff_ms / 1000
        ),
    )
    ctx = RunContext(db, settings, recorder, caller, since, progress)
    log.info("reconciliation run %s (%s%s) started", run_id, provider, ", dry run" if dry_run else "")
    try:
        runner(ctx)
    except Exception as error:
        log.exception("reconciliation run %s (%s) failed", run_id, provider)
        recorder.api_calls = caller.calls
        recorder.finish("failed", str(error) or type(error).__name__)
        return False
    recorder.api_calls = caller.calls
    recorder.finish("succeeded")
    log.info("reconciliation run %s (%s) succeeded: %s", run_id, provider, recorder.counts)
    return True


def reconcile_scheduled(db: Database, settings: Settings, date: str) -> Outcome:
    """The clock's nightly job for `date` (YYYY-MM-DD, UTC): once per provider and date."""
    outcome = reconcile(db, settings, scheduled_for=date)
    for note in outcome.notes:
        log.info("scheduled reconciliation: %s", note)
    return outcome
