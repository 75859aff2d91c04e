"""Hot balances by batching, not by waiting: concurrent ledger-entry requests on one balance, one transaction.

Every synchronous credit or debit takes its balance's row lock. Taken once per request, 64 clients on
one balance queue on that lock (and on a commit each) one after another. Here a request joins its
balance's queue instead; a writer per balance takes everything queued while the previous batch was
in flight (so a lone request waits for no timer, and batches grow by themselves under load) and
decides the batch in ONE transaction on a worker thread: the lock once, each request in arrival order
with its own entry, before/after and decision (`app.metering.entries.create_ledger_entries`), one
commit, and only then every answer: a 201/400 still means committed.

Across web processes the row lock still serialises batches, so a limit is never overshot. Distinct
balances have distinct writers and run side by side (within the thread limiter's tokens). The
database unreachable: every request of the batch gets the outage (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import anyio
from prometheus_client import Histogram

from app.catalogue import Catalogue
from app.db import Database
from app.errors import Unavailable
from app.group_commit import is_outage
from app.metering.entries import EntryAnswer, EntryAsk, EntryOutcome, EntryRequest, create_ledger_entries

log = logging.getLogger(__name__)

BalanceKey = tuple[str, str]  # (entitlement id, customer id)

BATCH_SIZE = Histogram(
    "tally_ledger_entry_batch_size",
    "Ledger-entry requests decided per transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
"""How far batching goes: under load on one balance the sizes approach the number of concurrent clients."""


@dataclass
class _Submission:
    ask: EntryAsk
    answer: asyncio.Future[EntryOutcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Lane:
    """One balance's queue and its writer; dropped when the queue runs dry, so idle balances cost nothing."""

    queue: deque[_Submission] = field(default_factory=deque)
    writer: asyncio.Task[None] | None = None


class LedgerEntryBatcher:
    """`submit` from any number of requests on the same event loop; per balance, one batch in flight at a time."""

    def __init__(
        self,
        db: Database,
        catalogue: Catalogue,
        *,
        max_batch: int = 500,
        decide: Callable[..., list[EntryAnswer]] = create_ledger_entries,
    ) -> None:
        self.db, self.catalogue, self.max_batch, self._decide = db, catalogue, max_batch, decide
        self._lanes: dict[BalanceKey, _Lane] = {}

    async def submit(self, entitlement_id: str, customer_id: str, request: EntryRequest, now: datetime) -> EntryOutcome:
        """The request's decision, committed when this returns; its error (4xx, or the outage) raised."""
        key = (entitlement_id, customer_id)
        lane = self._lanes.setdefault(key, _Lane())
        submission = _Submission(EntryAsk(request, now))
        lane.queue.append(submission)
        if lane.writer is None:
            lane.writer = asyncio.get_running_loop().create_task(self._write(key, lane), name=f"ledger-entries-{key}")
        return await submission.answer

    async def close(self) -> None:
        """Stop the writers; a batch in flight finishes (its thread is not abandoned), what is queued is refused."""
        lanes = list(self._lanes.values())
        for lane in lanes:
            while lane.queue:
                submission = lane.queue.popleft()
                if not submission.answer.done():
                    submission.answer.set_exception(
                        Unavailable("the server is shutting down; retry", code="shutting_down")
                    )
            if lane.writer is not None:
                lane.writer.cancel()
        for lane in lanes:
            if lane.writer is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.writer

    async def _write(self, key: BalanceKey, lane: _Lane) -> None:
        try:
            while lane.queue:
                batch: list[_Submission] = []
                while lane.queue and len(batch) < self.max_batch:
                    submission = lane.queue.popleft()
                    if not submission.answer.done():  # its request was cancelled while queued: never applied
                        batch.append(submission)
                if batch:
                    await self._run(key, batch)
        finally:
            lane.writer = None
            if not lane.queue and self._lanes.get(key) is lane:
                del self._lanes[key]

    async def _run(self, key: BalanceKey, batch: list[_Submission]) -> None:
        entitlement_id, customer_id = key
        BATCH_SIZE.observe(len(batch))
        answers: list[EntryAnswer] | None = None
        try:
            answers = await anyio.to_thread.run_sync(
                partial(
                    self._decide,
                    self.db,
                    self.catalogue,
                    entitlement_id=entitlement_id,
                    customer_id=customer_id,
                    asks=[submission.ask for submission in batch],
                )
            )
        except Exception as error:  # every request of the batch gets it; the writer lives on
            if is_outage(error):
                log.error("database unavailable for a batch of %d ledger entries: %s", len(batch), error)
                error = Unavailable("the database is unavailable; retry later", code="database_unavailable")
            else:
                log.exception("a batch of %d ledger entries failed", len(batch))
            answers = [error] * len(batch)
        finally:
            if answers is None:  # cancelled (shutting down): nobody is left waiting
                answers = [Unavailable("the server is shutting down; retry", code="shutting_down")] * len(batch)
            for submission, answer in zip(batch, answers, strict=True):
                if submission.answer.done():
                    continue
                if isinstance(answer, Exception):
                    submission.answer.set_exception(answer)
                else:
                    submission.answer.set_result(answer)
