"""Usage application benchmark (not a test): events applied per second by one worker process, next to bare inserts.

    .venv/bin/python bench/usage_apply.py [--events 8000] [--customers 50] [--batch 100] [--profile out.svg]

What it does, in one run on a scratch PostgreSQL database (dropped and made again) and a Redis db:
1. 50 Stripe plan customers (a subscription, its period opened and its credits granted, as a
   `customer.subscription.created` would) and 8,000 usage events stored beforehand as ingest stores
   them, half counted (`bench_call`), half summed (`bench_completion`, metadata.tokens).
2. Bare inserts: single-row INSERTs, each its own transaction (autocommit), from one psycopg
   connection: the floor any durable per-event work stands on. Measured before and after step 3.
3. One `dramatiq workers.process --processes 1 --threads 8` process (a fresh one each round) is handed
   the stored events, one message per ingest batch (`--batch` events of random customers, as the
   intake's group commit makes them; `--per-customer` for one customer per message); the clock runs
   from the first enqueue to the last event applied. `--profile out.svg` records it with py-spy meanwhile.
4. Every event applied or refused, none pending, and `tally verify` clean.
With `--rounds N`, steps 1-3 run N times with fresh events and the medians are reported: the machine
is shared, and the figure that matters is the ratio within a round.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CATALOGUE = """
[entitlements.bench_credits]
name = "Bench credits"
unit = "credit"
precision = 2
overage_enabled = true

[plans.bench]
stripe_price = "price_bench"
entitlement = "bench_credits"
unit = "credit"
included = 1000000
hard_cap = "unlimited"

[meters.bench_calls]
event_name = "bench_call"
aggregation = "count"
entitlement = "bench_credits"
units_per_credit = 1

[meters.bench_tokens]
event_name = "bench_completion"
aggregation = "sum"
key = "tokens"
entitlement = "bench_credits"
units_per_credit = 1000
"""


def configure_env(args: argparse.Namespace) -> None:
    base = args.postgres.rsplit("/", 1)[0]
    os.environ["DATABASE_URL"] = f"{base}/{args.database}"
    os.environ["REDIS_URL"] = args.redis
    os.environ.pop("BROKER_URL", None)
    plans = Path(tempfile.mkdtemp(prefix="tally-bench-")) / "plans.toml"
    plans.write_text(CATALOGUE)
    os.environ["TALLY_PLANS"] = str(plans)
    os.environ.setdefault("TALLY_API_KEYS", "bench-service-token-0123456789")


def scratch_database(args: argparse.Namespace) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{args.database}"'))
    engine.dispose()


def bare_inserts(dsn: str, count: int, run: str) -> float:
    """Single-row INSERT transactions per second from one psycopg connection (autocommit: one commit each)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS bench_bare_inserts "
            "(id BIGSERIAL PRIMARY KEY, event_id TEXT, created_at TIMESTAMPTZ)"
        )
        started = time.perf_counter()
        for n in range(count):
            connection.execute(
                "INSERT INTO bench_bare_inserts (event_id, created_at) VALUES (%s, now())", (f"{run}-{n}",)
            )
        return count / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (Linux /proc), for the share of the run spent computing."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=8000)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100, help="events per message (per ingest batch)")
    parser.add_argument("--per-customer", action="store_true", help="each message holds one customer's events")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--postgres",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="a database URL on the server; the bench makes its own scratch database beside it",
    )
    parser.add_argument("--database", default="tally_bench_usage_apply")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/10")
    parser.add_argument(
        "--profile", help="py-spy profile of the worker: a flame graph (.svg) or collapsed stacks (.txt)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="repeat steps 1-3 (fresh events) and report medians")
    args = parser.parse_args()
    configure_env(args)
    scratch_database(args)

    from sqlalchemy import func, select

    from app.billing.plans import open_plan_period
    from app.billing.subscriptions import ensure_customer
    from app.cli import migrate
    from app.config import get_settings
    from app.db import get_database, utcnow
    from app.ledger.audit import verify
    from app.ledger.posting import Source
    from app.metering import ingest
    from app.metering.models import UsageEvent
    from app.models import Subscription
    from app.queue import build_broker
    from app.tasks import USAGE_QUEUE, declare_jobs

    settings = get_settings()
    migrate(settings)
    db = get_database()
    catalogue = settings.catalogue
    broker = build_broker(settings)
    broker.client.flushdb()
    jobs = declare_jobs(broker, settings, db)
    run = uuid.uuid4().hex[:8]
    rng = random.Random(args.seed)

    # 1. Stripe plan customers, and the events stored beforehand
    now = utcnow()
    customers = [f"cus_bench_{n:03d}" for n in range(args.customers)]
    with db.write() as session:
        for customer in customers:
            ensure_customer(session, customer, "stripe")
            sub = f"sub_{customer}"
            session.add(
                Subscription(
                    id=sub,
                    provider="stripe",
                    customer_id=customer,
                    status="active",
                    plan_key="bench",
                    price_id="price_bench",
                    current_period_start=now,
                    current_period_end=now + timedelta(days=30),
                )
            )
            session.flush()
            open_plan_period(
                session,
                catalogue,
                catalogue.plans["bench"],
                customer_id=customer,
                subscription_id=sub,
                start=now - timedelta(hours=1),
                end=now + timedelta(days=30),
                source=Source(description="bench"),
            )

    def pending() -> int:
        with db.read() as session:
            return int(
                session.execute(
                    select(func.count()).select_from(UsageEvent).where(UsageEvent.status == "pending")
                ).scalar_one()
            )

    dsn = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    results: list[tuple[float, float, float]] = []  # (bare, applied, worker CPU share) per round
    for round_number in range(1, args.rounds + 1):
        tag = f"{run}-r{round_number}"

        def event(n: int, customer: str, tag: str = tag) -> dict[str, object]:
            if n % 2:
                return {
                    "event_id": f"{tag}-{n}",
                    "customer_id": customer,
                    "event_name": "bench_completion",
                    "metadata": {"tokens": rng.randint(1, 4000)},
                }
            return {"event_id": f"{tag}-{n}", "customer_id": customer, "event_name": "bench_call"}

        if args.per_customer:
            owners = [customers[n * args.customers // args.events] for n in range(args.events)]
        else:
            owners = [rng.choice(customers) for _ in range(args.events)]
        messages: list[list[int]] = []
        for start in range(0, args.events, args.batch):
            batch = [event(n, owners[n]) for n in range(start, min(start + args.batch, args.events))]
            stored_at = utcnow()
            stored = ingest.store_batch(db, ingest.parse_batch({"events": batch}, catalogue, stored_at), stored_at)
            messages.append(stored)
        assert sum(len(message) for message in messages) == args.events

        # 2. bare inserts, 3. the worker, 2. bare inserts again
        bare_before = bare_inserts(dsn, args.events, f"{tag}-a")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dramatiq",
                "workers.process",
                "--processes",
                "1",
                "--threads",
                str(args.threads),
                "--queues",
                USAGE_QUEUE,
            ],
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        profiler = None
        try:
            time.sleep(3)  # the worker is up: it has imported the app and connected to Redis
            if args.profile and round_number == 1:
                py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
                profile_format = "raw" if args.profile.endswith(".txt") else "flamegraph"
                profiler = subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--subprocesses",
                        "--rate",
                        "250",
                        "-o",
                        args.profile,
                        "--format",
                        profile_format,
                        "--pid",
                        str(worker.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                )
                time.sleep(1)
            # An idle Dramatiq consumer polls Redis ever more slowly (up to --worker-timeout, 1 s): empty
            # messages (no-ops) keep it awake, so that the clock measures applying, not waking up.
            for _ in range(50):
                jobs.enqueue_usage([])
                time.sleep(0.02)
            cpu_started = cpu_seconds(worker.pid)
            started = time.perf_counter()
            for message in messages:
                jobs.enqueue_usage(message)
            deadline = time.monotonic() + 600
            while (left := pending()) and time.monotonic() < deadline:
                time.sleep(0.01)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(worker.pid) - cpu_started
        finally:
            if profiler is not None:
                profiler.send_signal(2)
                profiler.wait(timeout=60)
            worker.terminate()
            worker.wait(timeout=30)
        bare_after = bare_inserts(dsn, args.events, f"{tag}-b")
        bare, applied = (bare_before + bare_after) / 2, args.events / elapsed
        results.append((bare, applied, cpu / elapsed))
        print(
            f"round {round_number}: bare {bare:6.0f} /s (before {bare_before:.0f}, after {bare_after:.0f}), "
            f"applied {applied:6.0f} /s ({elapsed:.2f} s, worker CPU {100 * cpu / elapsed:.0f}% of a core), "
            f"ratio {applied / bare:.2f}",
            flush=True,
        )
        if left:
            sys.exit(f"{left} events still pending after 600 s")

    # 4. the outcome
    with db.read() as session:
        statuses = dict(session.execute(select(UsageEvent.status, func.count()).group_by(UsageEvent.status)).all())
        problems = verify(session)
    ratios = sorted(applied / bare for bare, applied, _ in results)
    print(
        f"events: {args.events} a round over {args.customers} customers, messages of {args.batch} "
        f"({'one customer each' if args.per_customer else 'random customers'}); "
        f"one worker process, {args.threads} threads; {args.rounds} round(s)"
    )
    print(f"bare single-row INSERT transactions: median {statistics.median(b for b, _, _ in results):8.0f} /s")
    print(f"usage events applied:                median {statistics.median(a for _, a, _ in results):8.0f} /s")
    print(f"ratio applied / bare:                median {statistics.median(ratios):8.2f}  (min {ratios[0]:.2f})")
    print(f"statuses: {statuses}; tally verify: {'clean' if not problems else problems[:5]}")
    if problems or statuses.get("pending"):
        sys.exit(1)


if __name__ == "__main__":
    main()
