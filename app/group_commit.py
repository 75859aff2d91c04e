"""Group commit: rows from concurrent requests written by one statement, one commit, one doorbell.

A request hands its rows to the writer and waits. The writer takes everything queued while the
previous write was in flight (so a lone request waits for no timer, and under load batches grow by
themselves), inserts it with one `INSERT … ON CONFLICT DO NOTHING RETURNING`, commits, rings the
doorbell once for every new row, and only then answers each request: a 2xx still means committed.

- A duplicate (already stored, or twice in the same batch) answers None; the first of a batch wins.
- The database down: every request of the batch gets the error (the API answers 503).
- A row the database refuses for its content fails only its own request: the batch is split until
  the refusing request is alone, and the others are written.
- The doorbell (a broker) down changes nothing: the rows are committed; the sweeper rings later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError

from app.db import AsyncDatabase
from app.errors import Unavailable

log = logging.getLogger(__name__)

Ring = Callable[[list[int]], Awaitable[None]]


@dataclass
class _Submission:
    rows: list[dict[str, Any]]
    answer: asyncio.Future[list[int | None]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def is_outage(error: BaseException) -> bool:
    """True when the database could not be reached or dropped the connection (not a refused row)."""
    if isinstance(error, DBAPIError):
        return bool(error.connection_invalidated) or type(error).__name__ in ("OperationalError", "InterfaceError")
    return isinstance(error, (OSError, asyncio.TimeoutError))


class GroupCommit:
    """One writer task per table; `submit` from any number of requests on the same event loop."""

    def __init__(
        self, db: AsyncDatabase, table: Table, key: Sequence[str], *, ring: Ring | None = None, max_rows: int = 1000
    ) -> None:
        self.db, self.table, self.key, self.ring, self.max_rows = db, table, tuple(key), ring, max_rows
        self._queue: asyncio.Queue[_Submission] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        dialect = sqlite if db.is_sqlite else postgresql
        key_columns = [table.c[name] for name in self.key]
        self._insert = dialect.insert(table).on_conflict_do_nothing().returning(table.c.id, *key_columns)

    async def submit(self, rows: list[dict[str, Any]]) -> list[int | None]:
        """Store the rows (committed when this returns): each row's new id, or None for a duplicate."""
        if not rows:
            return []
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"group-commit-{self.table.name}")
        submission = _Submission(rows)
        await self._queue.put(submission)
        return await submission.answer

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].rows)
            while size < self.max_rows and not self._queue.empty():
                batch.append(self._queue.get_nowait())
                size += len(batch[-1].rows)
            try:
                await self._write(batch)
            except Exception:  # answered per submission below; the writer must live on
                log.exception("group commit of %s failed", self.table.name)

    async def _write(self, batch: list[_Submission]) -> None:
        try:
            answers = await self._insert_batch(batch)
        except Exception as error:
            if is_outage(error) or len(batch) == 1:
                if is_outage(error):
                    log.error("database unavailable for a batch of %s: %s", self.table.name, error)
                    error = Unavailable("the database is unavailable; retry later", code="database_unavailable")
                for submission in batch:
                    if not submission.answer.done():
                        submission.answer.set_exception(error)
                return
            middle = len(batch) // 2  # a refused row: isolate its request, write the others
            await self._write(batch[:middle])
            await self._write(batch[middle:])
            return
        new_ids = [row_id for answer in answers for row_id in answer if row_id is not None]
        if new_ids and self.ring is not None:
            await self.ring(new_ids)
        for submission, answer in zip(batch, answers, strict=True):
            if not submission.answer.done():
                submission.answer.set_result(answer)

    async def _insert_batch(self, batch: list[_Submission]) -> list[list[int | None]]:
        first: dict[tuple[Any, ...], int] = {}  # the key of a row's first occurrence in this batch
        unique_rows: list[dict[str, Any]] = []
        placement: list[list[tuple[tuple[Any, ...], bool]]] = []
        for submission in batch:
            places = []
            for row in submission.rows:
                key = tuple(row[name] for name in self.key)
                is_first = key not in first
                if is_first:
                    first[key] = len(unique_rows)
                    unique_rows.append(row)
                places.append((key, is_first))
            placement.append(places)
        # One key order for every batch, so the writers of several web processes take the unique
        # index's locks in the same order and never deadlock on each other.
        unique_rows.sort(key=lambda row: tuple(str(row[name]) for name in self.key))
        async with self.db.write() as connection:
            returned = (await connection.execute(self._insert, unique_rows)).all()
        inserted = {tuple(row[1:]): int(row[0]) for row in returned}
        return [[inserted.get(key) if is_first else None for key, is_first in places] for places in placement]
