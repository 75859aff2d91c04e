"""Stored runs and drift: what each reconciliation run checked, found and did, as rows and as JSON.

The recorder keeps the run's counts and buffers its drift rows, and writes both at every checkpoint
(after each provider page), so a run that stops half-way is stored with what it did up to there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Counter
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db import Database, Page, insert_ignoring_conflicts, table_of, utcnow
from app.reconciliation.models import ReconciliationDrift, ReconciliationRun, ReconciliationSeen

log = logging.getLogger("app.reconciliation")

RUNS = Counter("tally_reconciliation_runs_total", "Reconciliation runs finished", ["provider", "status"])
DRIFT = Counter("tally_reconciliation_drift_total", "Drift found by reconciliation", ["provider", "object_type"])

COUNTS = ("checked", "matched", "repaired", "drifted", "errors")


@dataclass(frozen=True)
class Drift:
    object_type: str
    object_id: str
    field: str
    tally_value: str | None
    provider_value: str | None
    action: str


def start_run(
    db: Database, provider: str, *, dry_run: bool, scheduled_for: str | None = None, since: datetime | None = None
) -> int | None:
    """A new run's id; None when the scheduled run of this provider and date exists already."""
    with db.write() as session:
        inserted = insert_ignoring_conflicts(
            session,
            ReconciliationRun,
            {
                "provider": provider,
                "dry_run": dry_run,
                "scheduled_for": scheduled_for,
                "status": "running",
                "started_at": utcnow(),
                "since": since,
                **dict.fromkeys(COUNTS, 0),
                "api_calls": 0,
            },
        )
        return None if inserted is None else int(inserted[0])


@dataclass
class Recorder:
    """One run's counts and drift, written at each checkpoint."""

    db: Database
    run_id: int
    provider: str
    dry_run: bool
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    api_calls: int = 0
    pending: list[Drift] = field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def drift(self, drift: Drift) -> None:
        """One differing field: logged, counted for Prometheus, stored at the next checkpoint."""
        log.warning(
            "reconciliation run %s: %s %s %s: tally=%s %s=%s -> %s",
            self.run_id,
            drift.object_type,
            drift.object_id,
            drift.field,
            drift.tally_value,
            self.provider,
            drift.provider_value,
            drift.action,
        )
        DRIFT.labels(self.provider, drift.object_type).inc()
        self.pending.append(drift)

    def checkpoint(self) -> None:
        with self.db.write() as session:
            self._write(session)

    def _write(self, session: Session) -> None:
        run = session.get(ReconciliationRun, self.run_id)
        assert run is not None
        for name in COUNTS:
            setattr(run, name, self.counts[name])
        run.api_calls = self.api_calls
        session.add_all(
            ReconciliationDrift(
                run_id=self.run_id,
                object_type=item.object_type,
                object_id=item.object_id[:255],
                field=item.field,
                tally_value=item.tally_value,
                provider_value=item.provider_value,
                action=item.action[:64],
            )
            for item in self.pending
        )
        self.pending.clear()

    def finish(self, status: str, error: str | None = None) -> None:
        with self.db.write() as session:
            self._write(session)
            run = session.get(ReconciliationRun, self.run_id)
            assert run is not None
            run.status, run.error, run.finished_at = status, error, utcnow()
            session.execute(delete(ReconciliationSeen).where(ReconciliationSeen.run_id == self.run_id))
        RUNS.labels(self.provider, status).inc()

    def saw(self, session: Session, object_ids: Iterable[str]) -> None:
        """Remember listed ids (one multi-row insert per page), for the "unknown to the provider" query."""
        rows = [{"run_id": self.run_id, "object_id": object_id} for object_id in set(object_ids)]
        if rows:
            session.execute(table_of(ReconciliationSeen).insert(), rows)


def last_success(session: Session, provider: str) -> datetime | None:
    """When the last successful (not dry) run of `provider` started."""
    return session.execute(
        select(ReconciliationRun.started_at)
        .where(
            ReconciliationRun.provider == provider,
            ReconciliationRun.status == "succeeded",
            ReconciliationRun.dry_run.is_(False),
        )
        .order_by(ReconciliationRun.started_at.desc())
        .limit(1)
    ).scalar_one_or_none()


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def run_document(session: Session, run: ReconciliationRun) -> dict[str, Any]:
    """The run as JSON, the one shape the CLI and the admin API share."""
    drifts = session.execute(
        select(ReconciliationDrift).where(ReconciliationDrift.run_id == run.id).order_by(ReconciliationDrift.id)
    ).scalars()
    return {
        "id": run.id,
        "provider": run.provider,
        "dry_run": run.dry_run,
        "status": run.status,
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "error": run.error,
        "counts": {name: getattr(run, name) for name in COUNTS},
        "api_calls": run.api_calls,
        "drifts": [
            {
                "object_type": drift.object_type,
                "object_id": drift.object_id,
                "field": drift.field,
                "tally_value": drift.tally_value,
                "provider_value": drift.provider_value,
                "action": drift.action,
            }
            for drift in drifts
        ],
    }


def get_run(session: Session, run_id: int) -> dict[str, Any] | None:
    run = session.get(ReconciliationRun, run_id)
    return None if run is None else run_document(session, run)


def latest_run_ids(session: Session) -> list[int]:
    """The newest run of each provider (what `tally reconcile --report` shows without an id)."""
    ids = []
    for provider in ("stripe", "dodo"):
        found = session.execute(
            select(ReconciliationRun.id)
            .where(ReconciliationRun.provider == provider)
            .order_by(ReconciliationRun.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        if found is not None:
            ids.append(found)
    return ids


def list_runs(session: Session, page: Page, provider: str | None = None) -> list[dict[str, Any]]:
    """Runs newest first, one page."""
    query = select(ReconciliationRun).order_by(ReconciliationRun.id.desc()).limit(page.size).offset(page.offset)
    if provider:
        query = query.where(ReconciliationRun.provider == provider)
    return [run_document(session, run) for run in session.execute(query).scalars().all()]
