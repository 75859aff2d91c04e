"""A small HTTP/1.1 load client on raw asyncio (uvloop when installed): paced or closed-loop.

Debian's wrk cannot pace its requests, so the paced figures (P3's p99 at 1,000 req/s, P4's 500
ingests/s) come from here. It keeps `connections` keep-alive connections open and, in paced mode,
schedules request i at t0 + i/rate whatever happened before (an open-loop client): a request that
waits for a free connection counts its wait, so latencies are measured from the intended send time
(no coordinated omission). Requests still unsent `grace` seconds after the schedule ends are dropped
and counted as `unsent`; the achieved rate is answers / (last answer - t0).

P4 mode also runs a poller thread: every ~2 ms it asks the database which answered usage events are
no longer pending (`usage_events.status`, which the worker commits in the same transaction as the
deduction), so each event's "2xx answer -> deduction visible" time is measured in this one process,
on one monotonic clock. A poll observes an event at the poll's start, so the figure errs long by at
most one poll.

Run as a subprocess (`python -m bench.httpload SPEC.json`) it prints one JSON document, including
its own CPU use (user + system seconds / wall seconds), so a reader can see it is not the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - uvicorn[standard] brings it
    uvloop = None


def http_request(
    method: str, path: str, host: str, headers: dict[str, str] | None = None, body: str | bytes | None = None
) -> bytes:
    data = body.encode() if isinstance(body, str) else (body or b"")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> tuple[int, bytes]:
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise ConnectionError("answer without content-length")
    length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
    body = await reader.readexactly(length) if length else b""
    return status, body


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


@dataclass
class Outcome:
    sent: int = 0
    unsent: int = 0
    lost: int = 0  # sent, no answer (connection error or still in flight at the end)
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # from intended send time, seconds
    service: list[float] = field(default_factory=list)  # from actual send time
    bodies: list[tuple[int, int, bytes]] = field(default_factory=list)  # (i, status, body) when kept
    t0: float = 0.0
    last_answer: float = 0.0
    errors: Counter = field(default_factory=Counter)


async def run_load(
    host: str,
    port: int,
    make: Callable[[int], bytes],
    *,
    count: int,
    connections: int,
    rate: float | None = None,
    grace: float = 2.0,
    in_flight_timeout: float = 30.0,
    keep_bodies: bool = False,
    on_answer: Callable[[int, int, bytes, float], None] | None = None,
) -> Outcome:
    """Send requests 0..count-1 (`make(i)` gives the bytes); paced at `rate`/s, or closed-loop if None."""
    out = Outcome()
    queue: asyncio.Queue = asyncio.Queue()
    in_flight: dict[int, int] = {}

    async def connection(slot: int) -> None:
        reader = writer = None
        while True:
            item = await queue.get()
            if item is None:
                break
            i, intended = item
            data = make(i)
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                sent = time.monotonic()
                out.sent += 1
                in_flight[slot] = i
                status, body = await _exchange(reader, writer, data)
                del in_flight[slot]
            except (OSError, asyncio.IncompleteReadError, ConnectionError, ValueError) as error:
                in_flight.pop(slot, None)
                out.lost += 1
                out.errors[type(error).__name__] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            done = time.monotonic()
            out.last_answer = done
            out.statuses[status] += 1
            out.latencies.append(done - (intended if intended is not None else sent))
            out.service.append(done - sent)
            if keep_bodies:
                out.bodies.append((i, status, body))
            if on_answer is not None:
                on_answer(i, status, body, done)
        if writer is not None:
            writer.close()

    workers = [asyncio.create_task(connection(slot)) for slot in range(connections)]
    out.t0 = t0 = time.monotonic()
    if rate is None:
        for i in range(count):
            queue.put_nowait((i, None))
    else:
        i = 0
        while i < count:
            due = min(count, int((time.monotonic() - t0) * rate) + 1)
            while i < due:
                queue.put_nowait((i, t0 + i / rate))
                i += 1
            if i < count:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        deadline = t0 + count / rate + grace
        while not queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        while not queue.empty():  # the server could not keep up: what was never sent is dropped
            queue.get_nowait()
            out.unsent += 1
    for _ in workers:
        queue.put_nowait(None)
    _, pending = await asyncio.wait(workers, timeout=in_flight_timeout if rate is not None else None)
    for task in pending:
        task.cancel()
    out.lost += len(in_flight) if pending else 0
    return out


def run(coroutine: Any) -> Any:
    if uvloop is not None:
        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


# --- P4: answer -> deduction visible -------------------------------------------------------------


class VisibilityPoller(threading.Thread):
    """Polls the database for answered usage events that are no longer pending."""

    def __init__(self, database: str, interval: float = 0.002):
        super().__init__(daemon=True)
        self.database, self.interval = database, interval
        self.lock = threading.Lock()
        self.outstanding: dict[str, float] = {}
        self.latencies: list[float] = []
        self.polls = 0
        self.stop_at: float | None = None  # stop once nothing is outstanding, or at this time
        self.finished = threading.Event()

    def answered(self, event_id: str, at: float) -> None:
        with self.lock:
            self.outstanding[event_id] = at

    def _query(self) -> Callable[[list[str]], list[str]]:
        if self.database.startswith("postgresql"):
            import psycopg

            connection = psycopg.connect(self.database.replace("+psycopg", ""), autocommit=True)

            def query(ids: list[str]) -> list[str]:
                rows = connection.execute(
                    "SELECT event_id FROM usage_events WHERE event_id = ANY(%s) AND status <> 'pending'", (ids,)
                )
                return [row[0] for row in rows]
        else:
            import sqlite3

            connection = sqlite3.connect(
                self.database.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False
            )

            def query(ids: list[str]) -> list[str]:
                found: list[str] = []
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    found += [
                        row[0]
                        for row in connection.execute(
                            f"SELECT event_id FROM usage_events WHERE event_id IN ({marks}) AND status <> 'pending'",
                            chunk,
                        )
                    ]
                return found

        return query

    def run(self) -> None:
        query = self._query()
        while True:
            with self.lock:
                ids = list(self.outstanding)
            if not ids:
                if self.stop_at is not None:
                    break
                time.sleep(self.interval)
                continue
            if self.stop_at is not None and time.monotonic() > self.stop_at:
                break
            observed = time.monotonic()
            visible = query(ids)
            self.polls += 1
            with self.lock:
                for event_id in visible:
                    self.latencies.append(observed - self.outstanding.pop(event_id))
            time.sleep(self.interval)
        self.finished.set()


# --- the subprocess entry point -------------------------------------------------------------------


def _factory(spec: dict[str, Any]) -> Callable[[int], bytes]:
    host = f"{spec['host']}:{spec['port']}"
    auth = {"Authorization": f"Bearer {spec['token']}"} if spec.get("token") else {}
    kind = spec["kind"]
    if kind == "get":
        paths = spec["paths"]
        requests = [http_request("GET", path, host, auth) for path in paths]
        return lambda i: requests[i % len(requests)]
    if kind == "ingest":
        customers, prefix = spec["customers"], spec["prefix"]
        headers = {**auth, "Content-Type": "application/json"}

        def ingest(i: int) -> bytes:
            body = json.dumps(
                {
                    "events": [
                        {
                            "event_id": f"{prefix}-{i}",
                            "customer_id": customers[i % len(customers)],
                            "event_name": spec["event_name"],
                            "metadata": {spec["key"]: 1},
                        }
                    ]
                }
            )
            return http_request("POST", "/events/ingest", host, headers, body)

        return ingest
    if kind == "debit":
        headers = {**auth, "Content-Type": "application/json"}

        def debit(i: int) -> bytes:
            body = json.dumps(
                {
                    "entry_type": "debit",
                    "amount": str(spec["amount"]),
                    "idempotency_key": f"{spec['prefix']}-{i}",
                    "reason": "bench",
                }
            )
            return http_request("POST", spec["path"], host, headers, body)

        return debit
    raise ValueError(f"unknown kind {kind!r}")


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    make = _factory(spec)
    rate = spec.get("rate")
    count = spec["count"] if rate is None else int(rate * spec["duration"])
    poller = VisibilityPoller(spec["poll_database"]) if spec.get("poll_database") else None
    prefix = spec.get("prefix", "")
    ingested = Counter()

    def on_answer(i: int, status: int, body: bytes, at: float) -> None:
        if status == 200 and poller is not None:
            ingested[body.strip()] += 1
            poller.answered(f"{prefix}-{i}", at)

    if poller is not None:
        poller.start()
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    outcome = run(
        run_load(
            spec["host"],
            spec["port"],
            make,
            count=count,
            connections=spec["connections"],
            rate=rate,
            grace=spec.get("grace", 2.0),
            on_answer=on_answer,
        )
    )
    usage1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    result: dict[str, Any] = {
        "planned": count,
        "sent": outcome.sent,
        "unsent": outcome.unsent,
        "lost": outcome.lost,
        "statuses": {str(k): v for k, v in sorted(outcome.statuses.items())},
        "errors": dict(outcome.errors),
        "answered": sum(outcome.statuses.values()),
        "seconds": (outcome.last_answer - outcome.t0) if outcome.last_answer else None,
        "p50_ms": _ms(percentile(outcome.latencies, 0.5)),
        "p99_ms": _ms(percentile(outcome.latencies, 0.99)),
        "max_ms": _ms(max(outcome.latencies, default=None)),
        "service_p50_ms": _ms(percentile(outcome.service, 0.5)),
        "service_p99_ms": _ms(percentile(outcome.service, 0.99)),
        "client_cpu": _cpu(usage0, usage1, wall1 - wall0),
    }
    ok = sum(v for k, v in outcome.statuses.items() if 200 <= k < 300)
    result["rate"] = ok / result["seconds"] if result["seconds"] else 0.0
    if poller is not None:
        result["ingested_bodies"] = {k.decode(): v for k, v in ingested.items()}
        poller.stop_at = time.monotonic() + spec.get("visible_timeout", 60.0)
        poller.finished.wait(spec.get("visible_timeout", 60.0) + 5)
        usage2, wall2 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        with poller.lock:
            not_visible = len(poller.outstanding)
        result.update(
            {
                "visible": len(poller.latencies),
                "not_visible": not_visible,
                "polls": poller.polls,
                "visible_p50_ms": _ms(percentile(poller.latencies, 0.5)),
                "visible_p99_ms": _ms(percentile(poller.latencies, 0.99)),
                "visible_max_ms": _ms(max(poller.latencies, default=None)),
                "client_cpu_with_poller": _cpu(usage0, usage2, wall2 - wall0),
            }
        )
    print(json.dumps(result))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _cpu(before: resource.struct_rusage, after: resource.struct_rusage, wall: float) -> dict[str, float]:
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "cpu_s": round(used, 2),
        "wall_s": round(wall, 2),
        "share_of_one_core": round(used / wall, 3) if wall else 0,
    }


if __name__ == "__main__":
    main(sys.argv[1])
