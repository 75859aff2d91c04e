"""Reads per second of `GET /usage` and the balance route, next to a bare Starlette GET on the same server.

    .venv/bin/python bench/reads.py [--duration 10] [--rate 1000] [--paced-seconds 10] [--rounds 3]
                                    [--stored-token] [--profile usage|balance --profile-seconds 10]

Not a test; run by hand. PostgreSQL on 127.0.0.1 (BENCH_DATABASE_URL; default database
`tally_bench_reads`, dropped and migrated afresh each run). One uvicorn process serves Tally's app plus
`GET /bare` (a bare Starlette handler answering a small JSON object); the in-process broker is
configured but not run. A few customers are put on the test catalogue's `basic` plan with some usage.

Per route, in one run (so machine noise hits all alike):
1. saturation: `wrk -t1 -c32 -d<duration>s --latency` with `Authorization: Bearer <service token>`
   (a TALLY_API_KEYS token, or with --stored-token one made by `tally keys create --service`), and
   the server process's CPU time per request (from /proc: steadier than req/s on a shared machine);
2. paced: this process's own asyncio client (raw HTTP/1.1 keep-alive, no library overhead) sends
   <rate> req/s open-loop over 32 connections, <paced-seconds> per route, the routes taking turns
   every half second (so a burst of noise falls on all of them alike); latency counts from each
   request's scheduled time, so a late send is not hidden. The client prints its own CPU use: if it
   nears 100 % the figures are the client's, not the server's.
The figures that matter are the ratios to the bare GET, measured in the same run.

--profile ROUTE runs py-spy (`pip install py-spy`) on the server while wrk drives ROUTE and writes
its samples (raw collapsed stacks) into $TMPDIR/tally-bench-profiles/; `bench/profile_summary.py FILE`
says where the time went.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVICE_TOKEN = "bench-reads-service-token-0123456789"
CUSTOMERS = 8
ROUTES = {
    "bare": "/bare",
    "usage": "/usage?customer_id=cus_bench_0",
    "balance": "/credit-entitlements/requests/balances/cus_bench_0",
}


def configure_env() -> str:
    """The server's and this process's settings; returns the database URL."""
    url = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/tally_bench_reads")
    os.environ.update(
        {
            "DATABASE_URL": url,
            "TALLY_API_KEYS": SERVICE_TOKEN,
            "TALLY_PLANS": str(ROOT / "tests" / "fixtures" / "plans.toml"),
        }
    )
    for name in ("REDIS_URL", "BROKER_URL"):
        os.environ.pop(name, None)
    return url


# --- the server -------------------------------------------------------------------------------


def server() -> object:
    """uvicorn --factory bench.reads:server: Tally's app plus a bare GET in the same process."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from app.web import create_app

    async def bare(_request: Request) -> JSONResponse:
        """Answers a small JSON object and nothing else: the ceiling of this server and client."""
        return JSONResponse({"ok": True})

    app = create_app(run_workers=False)
    app.router.routes.append(Route("/bare", bare, methods=["GET"]))
    return app


# --- the data ---------------------------------------------------------------------------------


def prepare_database(url: str) -> None:
    """A fresh, migrated database; customers on the `basic` plan (5000 included, cap 6000) with usage."""
    from sqlalchemy import create_engine, text

    admin_url, name = url.rsplit("/", 1)
    admin = create_engine(f"{admin_url}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        if not connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    scratch = create_engine(url)
    with scratch.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    scratch.dispose()

    from app.billing.plans import open_plan_period
    from app.billing.snapshots import Watermark
    from app.billing.subscriptions import SubscriptionSnapshot, apply_subscription_snapshot
    from app.cli import migrate
    from app.config import get_settings
    from app.db import get_database, utcnow
    from app.ledger.posting import Source
    from app.ledger.service import deduct, lock_balance

    settings = get_settings()
    migrate(settings)
    db = get_database()
    plan = settings.catalogue.plan_for(price_id="price_123", product_id="prod_123")
    assert plan is not None
    now = utcnow().replace(microsecond=0)
    start, end = now - timedelta(days=10), now + timedelta(days=20)
    for n in range(CUSTOMERS):
        customer, sub_id = f"cus_bench_{n}", f"sub_bench_{n}"
        with db.write() as session:
            snapshot = SubscriptionSnapshot(
                id=sub_id,
                provider="stripe",
                customer_id=customer,
                status="active",
                product_id="prod_123",
                price_id="price_123",
                quantity=1,
                period_start=start,
                period_end=end,
                cancel_at_period_end=False,
                canceled_at=None,
                ended_at=None,
                plan_key=plan.key,
            )
            apply_subscription_snapshot(session, snapshot, Watermark(at=1, rank=0, event_id=f"evt_{sub_id}"))
            open_plan_period(
                session,
                settings.catalogue,
                plan,
                customer_id=customer,
                subscription_id=sub_id,
                start=start,
                end=end,
                source=Source(),
            )
            balance = lock_balance(session, customer, settings.catalogue.entitlement_for(plan).id)
            deduct(session, balance, 1000 + 400 * n, source=Source(dedupe_key=f"usage:{sub_id}"), now=start)
    db.dispose()


def stored_service_token() -> str:
    from app.db import get_database
    from app.keys import create_key

    return create_key(get_database(), scope="service", label="bench/reads.py")


# --- saturation: wrk --------------------------------------------------------------------------


@dataclass
class WrkResult:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: str
    server_cpu_us: float = 0.0  # the server process's CPU time per request (user + system)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(figure: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(us|ms|s)", figure).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, token: str, duration: int, server_pid: int | None = None) -> WrkResult:
    cpu_before = process_cpu_seconds(server_pid) if server_pid else 0.0
    output = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{duration}s", "--latency", "-H", f"Authorization: Bearer {token}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    errors = " ".join(line.strip() for line in output.splitlines() if "Non-2xx" in line or "Socket errors" in line)
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    cpu = (process_cpu_seconds(server_pid) - cpu_before) / max(requests, 1) * 1e6 if server_pid else 0.0
    return WrkResult(rate, p50, p99, errors, cpu)


# --- paced: an open-loop asyncio client -------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that has at most one request in flight."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0 or self.waiter is None:
            return
        head = self.buffer[:head_end].lower()
        match = re.search(rb"content-length:\s*(\d+)", head)
        length = int(match.group(1)) if match else 0
        if len(self.buffer) < head_end + 4 + length:
            return
        status = int(head[9:12])
        self.buffer = self.buffer[head_end + 4 + length :]
        waiter, self.waiter = self.waiter, None
        waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("closed"))

    async def request(self, raw: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


@dataclass
class PacedResult:
    sent: int
    achieved_rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    client_cpu: float
    bad_statuses: dict[int, int] = field(default_factory=dict)


async def _paced(
    port: int, paths: dict[str, str], token: str, rate: float, seconds: float, connections: int, slice_seconds: float
) -> dict[str, PacedResult]:
    """`rate` req/s open-loop over `connections`, `seconds` per route, the routes taking turns every slice."""
    loop = asyncio.get_running_loop()
    raws = {
        name: (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nAccept: */*\r\n\r\n"
        ).encode()
        for name, path in paths.items()
    }
    names = list(paths)
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        _, protocol = await loop.create_connection(_Connection, "127.0.0.1", port)
        idle.put_nowait(protocol)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    bad: dict[str, dict[int, int]] = {name: {} for name in names}
    failures: list[BaseException] = []

    async def one(name: str, scheduled: float) -> None:
        connection = await idle.get()
        try:
            status = await connection.request(raws[name])
        except Exception as error:
            failures.append(error)
            return
        latencies[name].append(time.perf_counter() - scheduled)
        idle.put_nowait(connection)
        if status != 200:
            bad[name][status] = bad[name].get(status, 0) + 1

    per_slice = max(1, int(rate * slice_seconds))
    total = int(rate * seconds) * len(names)
    tasks: set[asyncio.Task[None]] = set()
    cpu_started, started = time.process_time(), time.perf_counter()
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - started) * rate) + 1)
        while sent < due:  # every request whose time has come, each stamped with its own schedule
            name = names[(sent // per_slice) % len(names)]
            task = loop.create_task(one(name, started + sent / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
    await asyncio.gather(*tasks)
    if failures:
        raise RuntimeError(f"{len(failures)} paced requests failed, the first: {failures[0]!r}")
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    while not idle.empty():
        connection = idle.get_nowait()
        assert connection.transport is not None
        connection.transport.close()
    results = {}
    for name in names:
        ordered = sorted(latencies[name])
        results[name] = PacedResult(
            sent=len(ordered),
            achieved_rate=total / wall,
            p50_ms=ordered[len(ordered) // 2] * 1000,
            p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
            max_ms=ordered[-1] * 1000,
            client_cpu=cpu / wall,
            bad_statuses=bad[name],
        )
    return results


def run_paced(
    port: int, paths: dict[str, str], token: str, rate: float, seconds: float, slice_seconds: float = 0.5
) -> dict[str, PacedResult]:
    try:
        import uvloop

        return uvloop.run(_paced(port, paths, token, rate, seconds, 32, slice_seconds))
    except ImportError:
        return asyncio.run(_paced(port, paths, token, rate, seconds, 32, slice_seconds))


# --- the run ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_up(port: int, token: str) -> None:
    import httpx

    for _ in range(200):
        try:
            answer = httpx.get(
                f"http://127.0.0.1:{port}{ROUTES['usage']}", timeout=2, headers={"Authorization": f"Bearer {token}"}
            )
            if answer.status_code != 200:
                raise SystemExit(f"GET /usage answered {answer.status_code}: {answer.text}")
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def profile(pid: int, url: str, token: str, seconds: int, route: str) -> None:
    """py-spy record (flame graph) and py-spy's raw top functions while wrk drives the route."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(tempfile.gettempdir()) / "tally-bench-profiles"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # --gil: only the thread holding the GIL, i.e. where this process spends CPU (waits are not work).
    recorder = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "200",
            "--gil",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out / f"{route}-{stamp}.txt"),
        ]
    )
    time.sleep(0.5)
    result = run_wrk(url, token, seconds)
    recorder.wait()
    print(f"  profiled {route}: {result.rate:.0f} req/s under py-spy; raw stacks in {out}/{route}-{stamp}.txt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per route")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced requests per second")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each driving every route in turn")
    parser.add_argument("--stored-token", action="store_true", help="use a token stored in the database")
    parser.add_argument("--routes", default="bare,usage,balance")
    parser.add_argument("--profile", choices=["usage", "balance", "bare"])
    parser.add_argument("--profile-seconds", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/reads.py needs wrk (apt-get install -y wrk)")

    url = configure_env()
    prepare_database(url)
    token = stored_service_token() if args.stored_token else SERVICE_TOKEN
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.reads:server",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        cwd=ROOT,
    )
    routes = [name for name in args.routes.split(",") if name]
    saturated: dict[str, list[WrkResult]] = {name: [] for name in routes}
    paced: dict[str, list[PacedResult]] = {name: [] for name in routes}
    try:
        _wait_until_up(port, token)
        base = f"http://127.0.0.1:{port}"
        for name in routes:  # warm up every path: pools, caches, compiled statements
            run_wrk(base + ROUTES[name], token, 2)
        if args.profile:
            profile(process.pid, base + ROUTES[args.profile], token, args.profile_seconds, args.profile)
            return 0
        for _ in range(args.rounds):
            for name in routes:
                saturated[name].append(run_wrk(base + ROUTES[name], token, args.duration, process.pid))
            turns = run_paced(port, {name: ROUTES[name] for name in routes}, token, args.rate, args.paced_seconds)
            for name in routes:
                paced[name].append(turns[name])
    finally:
        process.terminate()
        process.wait(timeout=10)

    kind = "stored in the database" if args.stored_token else "TALLY_API_KEYS"
    print(f"one uvicorn process, PostgreSQL; token: {kind}; {args.rounds} round(s)")
    print(f"saturation: wrk -t1 -c32 -d{args.duration}s (median of rounds)")
    bare_rate = statistics.median(r.rate for r in saturated["bare"]) if "bare" in saturated else None
    for name in routes:
        rate = statistics.median(r.rate for r in saturated[name])
        p50 = statistics.median(r.p50_ms for r in saturated[name])
        p99 = statistics.median(r.p99_ms for r in saturated[name])
        ratio = f"{rate / bare_rate:5.2f}" if bare_rate else "  n/a"
        errors = "; ".join(r.errors for r in saturated[name] if r.errors)
        cpu = statistics.median(r.server_cpu_us for r in saturated[name])
        rounds = ""
        if bare_rate and args.rounds > 1:  # each round's ratio against the bare GET of the same round
            rounds = "  rounds: " + ", ".join(
                f"{r.rate / b.rate:.2f}" for r, b in zip(saturated[name], saturated["bare"], strict=True)
            )
        print(
            f"  {name:<8} {rate:8.0f} req/s  ratio to bare {ratio}  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
            f"  server CPU {cpu:6.1f} us/request{rounds}" + (f"  [{errors}]" if errors else "")
        )
    print(
        f"paced: {args.rate:.0f} req/s over 32 connections, {args.paced_seconds:.0f} s per route in turns of 0.5 s"
        " (median of rounds)"
    )
    bare_p99 = statistics.median(r.p99_ms for r in paced["bare"]) if "bare" in paced else None
    for name in routes:
        results = paced[name]
        p50 = statistics.median(r.p50_ms for r in results)
        p99 = statistics.median(r.p99_ms for r in results)
        delta = f"{p99 - bare_p99:+6.2f} ms" if bare_p99 is not None else "n/a"
        bad = {k: v for r in results for k, v in r.bad_statuses.items()}
        worst = max(r.max_ms for r in results)
        achieved = statistics.median(r.achieved_rate for r in results)
        print(
            f"  {name:<8} {sum(r.sent for r in results):6d} requests at {achieved:5.0f}/s  "
            f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  (p99 - bare {delta})  max {worst:6.1f} ms"
            f"  client CPU {statistics.median(r.client_cpu for r in results) * 100:4.0f} %"
            + (f"  non-200: {bad}" if bad else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
