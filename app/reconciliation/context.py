"""What one provider's reconciliation needs while it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from app.catalogue import Catalogue
from app.config import Settings
from app.db import Database
from app.models import Subscription
from app.reconciliation.limits import ApiCaller
from app.reconciliation.models import ReconciliationSeen
from app.reconciliation.runs import Drift, Recorder

PAGE_SIZE = 100


@dataclass
class RunContext:
    db: Database
    settings: Settings
    recorder: Recorder
    caller: ApiCaller
    since: datetime | None
    progress: Callable[[str], None] | None = None

    @property
    def run_id(self) -> int:
        return self.recorder.run_id

    @property
    def dry_run(self) -> bool:
        return self.recorder.dry_run

    @property
    def catalogue(self) -> Catalogue:
        return self.settings.catalogue

    @property
    def watermark_id(self) -> str:
        """The event id of a repair's watermark: which run set the state."""
        return f"reconcile:{self.run_id}"

    def count(self, name: str, n: int = 1) -> None:
        self.recorder.count(name, n)

    def drift(self, drift: Drift) -> None:
        self.recorder.drift(drift)

    def checkpoint(self, what: str = "") -> None:
        """Store counts and drift so far; a run that stops later is stored with what it did up to here."""
        self.recorder.api_calls = self.caller.calls
        self.recorder.checkpoint()
        if self.progress is not None:
            counts = self.recorder.counts
            self.progress(
                f"{self.recorder.provider}: {what} checked {counts['checked']}, drifted {counts['drifted']}, "
                f"repaired {counts['repaired']}, errors {counts['errors']}, api calls {self.caller.calls}"
            )


def report_unknown_subscriptions(ctx: RunContext, provider: str, provider_name: str) -> None:
    """Subscriptions Tally holds that the provider's listing did not return: reported, never deleted.

    What the listing returned is in `reconciliation_seen`, so this is a paged query, not a set held
    in memory."""
    after = ""
    while True:
        with ctx.db.read() as session:
            seen = select(ReconciliationSeen.object_id).where(ReconciliationSeen.run_id == ctx.run_id)
            rows = session.execute(
                select(Subscription.id, Subscription.status)
                .where(Subscription.provider == provider, Subscription.id > after, Subscription.id.not_in(seen))
                .order_by(Subscription.id)
                .limit(PAGE_SIZE)
            ).all()
        if not rows:
            return
        for subscription_id, status in rows:
            after = subscription_id
            ctx.count("checked")
            ctx.count("drifted")
            ctx.drift(Drift("subscription", subscription_id, "exists", status, "missing", "reported"))
        ctx.checkpoint(f"subscriptions unknown to {provider_name}")
