"""Synchronous debits per second on ONE hot balance, next to pgbench's bare one-row UPDATE, in one run.

    .venv/bin/python bench/debits.py [--seconds 10] [--connections 64] [--rounds 3] [--credits N]
                                     [--same-balance] [--profile /tmp/debits.txt]

Not a test: run by hand on PostgreSQL (BENCH_DATABASE_URL, default database tally_bench_debits on
127.0.0.1; Redis db 12 as the broker, so the web process runs no workers). One uvicorn web process
serves the app; wrk (`apt-get install -y wrk`) sends `--connections` concurrent debits of 1 credit,
each with its own idempotency key, to one customer's balance of `--credits` (overage disabled), a new
balance each round unless `--same-balance`. Each round runs `pgbench -n -c 64 -j 2 -T seconds` on a
one-row table first, then wrk for as long, so machine noise hits both alike; the ratio is the figure
that matters, not the absolute rates.

After the load, the counts are checked against the database: every 201 is one ledger entry, the
balance is what the grant minus the accepted debits leaves (never below zero: no overshoot), and
`tally verify` (app.ledger.audit.verify) is clean. `--profile FILE` samples the web process with
py-spy during the first wrk round and writes where its time went (by function, own and inclusive).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.db import Database

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench-service-token-0123456789"
ENTITLEMENT = "bench_credits"
CATALOGUE = f"""
[entitlements.{ENTITLEMENT}]
name = "Bench credits"
unit = "credit"
precision = 0
overage_enabled = false
"""

WRK_SCRIPT = r"""
-- one debit of AMOUNT per request, each with its own idempotency key; counts by status in done()
local threads = {}
function setup(thread) table.insert(threads, thread); thread:set("tid", #threads) end
local path, token, prefix, amount
sent, s201, s400, sother = 0, 0, 0, 0
function init(args) path, token, prefix, amount = args[1], args[2], args[3], args[4] end
function request()
   sent = sent + 1
   local body = '{"entry_type":"debit","amount":"' .. amount .. '","idempotency_key":"' .. prefix .. "-" ..
                wrk.thread:get("tid") .. "-" .. sent .. '","reason":"bench"}'
   return wrk.format("POST", path, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token},
                     body)
end
function response(status, headers, body)
   if status == 201 then s201 = s201 + 1 elseif status == 400 then s400 = s400 + 1 else sother = sother + 1 end
end
function done(summary, latency, requests)
   local t = {s201 = 0, s400 = 0, sother = 0}
   for _, thread in ipairs(threads) do
      for name, _ in pairs(t) do t[name] = t[name] + (thread:get(name) or 0) end
   end
   io.write(string.format('BENCHJSON {"requests":%d,"duration_us":%d,"s201":%d,"s400":%d,"sother":%d,' ..
      '"errors":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n', summary.requests, summary.duration, t.s201, t.s400,
      t.sother, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
      latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def prepare_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    admin_url, name = url.rsplit("/", 1)
    engine = create_engine(f"{admin_url}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        if not connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()


def libpq_args(url: str) -> list[str]:
    """pgbench's connection arguments from a SQLAlchemy URL (postgresql+psycopg://user@host:port/db)."""
    match = re.match(
        r"postgresql(?:\+\w+)?://(?:(?P<user>[^:@/]+)(?::[^@]*)?@)?(?P<host>[^:/]+)(?::(?P<port>\d+))?/"
        r"(?P<db>[^?]+)",
        url,
    )
    if match is None:
        sys.exit(f"cannot read {url!r} as a PostgreSQL URL")
    return ["-h", match["host"], "-p", match["port"] or "5432", "-U", match["user"] or "postgres", match["db"]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def vacuum(db: Database) -> None:
    """Both sides start each round from vacuumed tables (autovacuum may be off on a test cluster)."""
    from sqlalchemy import text

    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM bench_one_row, balances, grants, ledger_entries, ledger_requests"))


def run_pgbench(url: str, seconds: int, script: Path) -> float:
    started = children_cpu()
    result = subprocess.run(
        ["pgbench", "-n", "-c", "64", "-j", "2", "-T", str(seconds), "-f", str(script), *libpq_args(url)],
        capture_output=True,
        text=True,
    )
    match = re.search(r"tps = ([\d.]+)", result.stdout)
    if result.returncode != 0 or match is None:
        sys.exit(f"pgbench failed:\n{result.stdout}\n{result.stderr}")
    print(f"  pgbench: {float(match[1]):8.0f} UPDATE/s   (client CPU {children_cpu() - started:.1f} s)")
    return float(match[1])


def run_wrk(base: str, seconds: int, connections: int, script: Path, customer: str, prefix: str) -> dict[str, float]:
    path = f"/credit-entitlements/{ENTITLEMENT}/balances/{customer}/ledger-entries"
    started = children_cpu()
    result = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            base,
            "--",
            path,
            TOKEN,
            prefix,
            "1",
        ],
        capture_output=True,
        text=True,
    )
    line = next((line for line in result.stdout.splitlines() if line.startswith("BENCHJSON ")), None)
    if result.returncode != 0 or line is None:
        sys.exit(f"wrk failed:\n{result.stdout}\n{result.stderr}")
    figures: dict[str, float] = json.loads(line.removeprefix("BENCHJSON "))
    figures["client_cpu"] = children_cpu() - started
    return figures


ROLES = (  # the first frame (name, file) found in a sampled stack names its role
    ("worker threads, idle", ("WorkerThread.run", "anyio/_backends/_asyncio.py:1113")),
    ("ledger batches (worker thread)", ("create_ledger_entries", "metering/entries.py")),
    ("one request at a time (worker thread)", ("create_ledger_entry", "metering/entries.py")),
    ("authentication (worker threads)", ("authenticate", "api/auth.py")),
    ("event loop: HTTP, routing, JSON", ("Runner.run", "asyncio/runners.py")),
)


def role_of(frames: list[str]) -> str:
    for role, (name, where) in ROLES:
        if any(frame.startswith(name + " (") and where in frame for frame in frames):
            return role
    return "other"


def summarise_profile(raw: Path, out: Path) -> None:
    """py-spy's collapsed stacks -> time by role (event loop, batch thread...) and by function."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [
            re.sub(r" \(.*?/(site-packages|tally|wt-[\w-]+|lib/python[\d.]+)/", " (", frame)
            for frame in stack.split(";")
        ]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        roles[role_of(frames)] += count
    lines = [f"{total} samples of the web process (all threads)", "", "by role:"]
    lines += [f"  {100 * n / total:5.1f}%  {role}" for role, n in roles.most_common()]
    lines += ["", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(40)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(80)]
    out.write_text("\n".join(lines) + "\n")
    print(f"  profile: {out} (collapsed stacks in {raw})")


def settled_count(count: Callable[[], int]) -> int:
    """The entry count once it stops moving: wrk leaves requests in flight when it stops."""
    previous = -1
    while True:
        current = count()
        if current == previous:
            return current
        previous = current
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--credits", type=int, default=10**12, help="the balance's grant (overage is disabled)")
    parser.add_argument(
        "--same-balance",
        action="store_true",
        help="debit one balance in every round (its grant's updates pile up until vacuumed)",
    )
    parser.add_argument("--profile", type=Path, help="sample the web process with py-spy; write the summary here")
    args = parser.parse_args()

    url = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/tally_bench_debits")
    workdir = Path(tempfile.mkdtemp(prefix="tally-bench-debits-"))
    (workdir / "plans.toml").write_text(CATALOGUE)
    (workdir / "debit.lua").write_text(WRK_SCRIPT)
    (workdir / "update.sql").write_text("UPDATE bench_one_row SET v = v + 1 WHERE id = 1;\n")
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
        "TALLY_PLANS": str(workdir / "plans.toml"),
        "TALLY_API_KEYS": TOKEN,
        "PYTHONPATH": str(ROOT),
    }
    env.pop("BROKER_URL", None)
    os.environ.update(env)
    prepare_database(url)
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, check=True, cwd=ROOT, capture_output=True)

    from sqlalchemy import func, select, text

    from app.api.metering import entry_answer
    from app.billing.subscriptions import ensure_customer
    from app.config import get_settings
    from app.db import get_database, utcnow
    from app.ledger.audit import verify
    from app.metering import entries
    from app.models import Balance, LedgerEntry

    db = get_database()
    with db.engine.begin() as connection:
        connection.execute(text("CREATE TABLE IF NOT EXISTS bench_one_row (id INT PRIMARY KEY, v BIGINT NOT NULL)"))
        connection.execute(text("INSERT INTO bench_one_row VALUES (1, 0) ON CONFLICT DO NOTHING"))

    catalogue = get_settings().catalogue

    def open_balance() -> str:
        customer = f"cus_bench_{uuid.uuid4().hex[:10]}"
        with db.write() as session:
            ensure_customer(session, customer, "stripe")
        status, _ = entry_answer(
            entries.create_ledger_entry(
                db,
                catalogue,
                entitlement_id=ENTITLEMENT,
                customer_id=customer,
                now=utcnow(),
                request=entries.parse_entry_request(
                    {"entry_type": "credit", "amount": str(args.credits), "idempotency_key": "grant"}
                ),
            )
        )
        assert status == 201
        return customer

    def debits_committed(customer: str) -> int:
        with db.read() as session:
            return int(
                session.execute(
                    select(func.count())
                    .select_from(LedgerEntry)
                    .join(Balance)
                    .where(Balance.customer_id == customer, LedgerEntry.amount < 0)
                ).scalar_one()
            )

    port = 18000 + os.getpid() % 1000
    server_log = workdir / "server.log"
    with server_log.open("w") as log_file:  # wrk hangs up with requests in flight: their tracebacks go here
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.web:create_app",
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
            stdout=log_file,
            stderr=log_file,
        )
    base = f"http://127.0.0.1:{port}"
    rows: list[tuple[float, dict[str, float]]] = []
    answered: dict[str, int] = {}  # balance -> 201s counted by wrk
    customer = open_balance()
    try:
        import httpx

        for _ in range(100):
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        warm = run_wrk(base, 1, args.connections, workdir / "debit.lua", customer, "warm")
        answered[customer] = int(warm["s201"])
        print(
            f"one web process on {url}; {args.connections} wrk connections, debits of 1 on one balance of "
            f"{args.credits} (overage disabled), {'the same balance' if args.same_balance else 'a new one'} "
            f"each round; server log {server_log}"
        )
        for round_number in range(args.rounds):
            if not args.same_balance and round_number:
                customer = open_balance()
            print(f"round {round_number + 1}")
            vacuum(db)
            tps = run_pgbench(url, args.seconds, workdir / "update.sql")
            profiler = None
            if args.profile and round_number == 0:
                profiler = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "-p",
                        str(server.pid),
                        "-d",
                        str(args.seconds),
                        "-r",
                        "200",
                        "--format",
                        "raw",
                        "-o",
                        str(workdir / "profile.raw"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            server_cpu = cpu_seconds(server.pid)
            figures = run_wrk(base, args.seconds, args.connections, workdir / "debit.lua", customer, f"r{round_number}")
            figures["server_cpu"] = cpu_seconds(server.pid) - server_cpu
            if profiler is not None:
                profiler.wait(timeout=60)
                summarise_profile(workdir / "profile.raw", args.profile)
            rate = figures["s201"] / (figures["duration_us"] / 1e6)
            figures["rate"] = rate
            print(
                f"  debits:  {rate:8.0f} /s accepted (201), {figures['s400']:.0f} refused (400), "
                f"{figures['sother'] + figures['errors']:.0f} other/errors; p50 {figures['p50_us'] / 1000:.1f} ms, "
                f"p99 {figures['p99_us'] / 1000:.1f} ms, max {figures['max_us'] / 1000:.0f} ms; "
                f"server CPU {figures['server_cpu']:.1f} s, wrk CPU {figures['client_cpu']:.1f} s"
            )
            print(f"  ratio:   {rate / tps:.2f} of pgbench")
            rows.append((tps, figures))
            answered[customer] = answered.get(customer, 0) + int(figures["s201"])
    finally:
        server.terminate()
        server.wait(timeout=30)

    tps_median = statistics.median(tps for tps, _ in rows)
    rate_median = statistics.median(figures["rate"] for _, figures in rows)
    print(
        f"median: pgbench {tps_median:.0f} UPDATE/s, debits {rate_median:.0f} /s, "
        f"ratio {rate_median / tps_median:.2f}; "
        f"p50 {statistics.median(f['p50_us'] for _, f in rows) / 1000:.1f} ms, "
        f"p99 {statistics.median(f['p99_us'] for _, f in rows) / 1000:.1f} ms"
    )
    failed = False
    for customer, answered_201 in answered.items():
        committed = settled_count(partial(debits_committed, customer))
        with db.read() as session:
            balance = session.execute(select(Balance).where(Balance.customer_id == customer)).scalar_one()
        # wrk stops with requests in flight: those commit but their 201 is never counted: committed >= answered.
        exact = balance.balance == args.credits - committed and balance.overage == 0 and committed >= answered_201
        print(
            f"check {customer}: {committed} debits committed, {answered_201} answered 201, balance "
            f"{balance.balance} = {args.credits} - {committed}: {exact}"
        )
        failed = failed or not exact
    with db.read() as session:
        problems = verify(session)
    print(f"verify: {problems or 'clean'}")
    if failed or problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
