"""What one provider's reconciliation needs while it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from app.catalogue import Catalogue
from app.config import Settings
from app.db import Database
from app.reconciliation.limits import ApiCaller
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
