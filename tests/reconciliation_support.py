"""Shared wiring of the reconciliation tests: fake providers, settings pointing at them, deliveries."""

from __future__ import annotations

import json
from typing import Any

from fakes.dodo_api import DodoFake
from fakes.stripe_api import StripeFake
from sqlalchemy import func, select

from app.config import Settings, get_settings
from app.db import Database, get_database
from app.inbox import processing
from app.inbox.store import store_event
from app.ledger.audit import audit
from app.models import LedgerEntry
from app.reconciliation.runs import get_run
from app.reconciliation.service import reconcile


def recon_settings(stripe_fake: StripeFake | None = None, dodo_fake: DodoFake | None = None, **extra: Any) -> Settings:
    update: dict[str, Any] = {"reconcile_retries": 2, "reconcile_backoff_ms": 10, "reconcile_rate": 1000.0}
    if stripe_fake is not None:
        update.update(stripe_api_key="sk_test_recon", stripe_api_base=stripe_fake.url)
    if dodo_fake is not None:
        update.update(dodo_api_key="dodo_test_recon", dodo_base_url=dodo_fake.url)
    update.update(extra)
    return get_settings().model_copy(update=update)


def deliver(db: Database, provider: str, event_id: str, body: str) -> str | None:
    """A webhook through the inbox path, applied at once; the event's status (None for a duplicate)."""
    payload = json.loads(body)
    inbox_id = store_event(db, provider=provider, event_id=event_id, event_type=payload["type"], body=body)
    if inbox_id is None:
        return None
    outcome = processing.apply_events(db, get_settings().catalogue, [inbox_id], max_attempts=4)
    return outcome.statuses[inbox_id]


def deliver_stripe(fake: StripeFake, event_id: str) -> str | None:
    return deliver(get_database(), "stripe", event_id, fake.event_json(event_id))


def deliver_dodo(fake: DodoFake, entry: dict[str, Any]) -> str | None:
    return deliver(get_database(), "dodo", f"msg_{entry['id']}", json.dumps(fake.webhook_payload(entry)))


def run(settings: Settings, provider: str, **options: Any) -> dict[str, Any]:
    outcome = reconcile(get_database(), settings, providers=[provider], **options)
    assert len(outcome.run_ids) == 1, outcome.notes
    with get_database().read() as session:
        document = get_run(session, outcome.run_ids[0])
    assert document is not None
    return document


def entry_count() -> int:
    with get_database().read() as session:
        return int(session.execute(select(func.count()).select_from(LedgerEntry)).scalar_one())


def assert_verified(*, notices: bool = False) -> None:
    with get_database().read() as session:
        report = audit(session)
    assert report.problems == []
    if not notices:
        assert report.notices == []
