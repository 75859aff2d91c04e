"""Usage metering benchmark (not a test): throughput of one worker process, and ingest-to-balance latency.

Needs PostgreSQL and Redis (the production shape):

    DATABASE_URL=postgresql+psycopg://… REDIS_URL=redis://… .venv/bin/python bench/usage.py [--events 20000]

1. Bare inserts: the same number of single-row INSERTs, each its own transaction, into a scratch
   table, from this process: the floor any durable per-event work stands on.
2. Throughput: events are stored as ingest stores them, then one `dramatiq workers.actors` process
   (1 process, 8 threads) is handed the batches; the clock runs from the first enqueue to the last
   event applied. Each batch belongs to one customer, as a service reporting its own users would send.
3. Latency: single-event `POST /events/ingest` calls against the app under uvicorn; from the answer
   to the balance (its `period_used`) showing the deduction, polled every millisecond.
The migrations run first; the bench's customers are new each run and left in place.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CATALOGUE = """
[entitlements.bench_requests]
name = "Bench requests"
unit = "request"
precision = 0
overage_enabled = true

[meters.bench_calls]
event_name = "bench_call"
aggregation = "count"
entitlement = "bench_requests"
"""
BENCH_TOKEN = "bench-service-token-0123456789"


def configure_env() -> None:
    if not os.environ.get("DATABASE_URL", "").startswith("postgresql") or not os.environ.get("REDIS_URL"):
        sys.exit("bench/usage.py needs DATABASE_URL=postgresql+psycopg://… and REDIS_URL=redis://…")
    plans = Path(tempfile.mkdtemp(prefix="tally-bench-")) / "plans.toml"
    plans.write_text(CATALOGUE)
    os.environ["TALLY_PLANS"] = str(plans)
    os.environ["TALLY_API_KEYS"] = BENCH_TOKEN


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--latency-samples", type=int, default=300)
    args = parser.parse_args()
    configure_env()

    import httpx
    import uvicorn
    from sqlalchemy import func, select, text

    from app.billing.subscriptions import ensure_customer
    from app.cli import migrate
    from app.config import get_settings
    from app.db import get_database, utcnow
    from app.ledger.service import grant, lock_balance, sync_entitlement
    from app.metering import ingest
    from app.metering.models import UsageEvent
    from app.models import Balance
    from app.web import create_app
    from workers import actors

    settings = get_settings()
    migrate(settings)
    db = get_database()
    run = uuid.uuid4().hex[:8]
    catalogue = settings.catalogue

    customers = [f"bench_{run}_{n}" for n in range(max(args.events // args.batch, 1) + 1)]
    with db.write() as session:
        sync_entitlement(session, catalogue.entitlements["bench_requests"])
        for customer in customers:
            ensure_customer(session, customer, "stripe")
            balance = lock_balance(session, customer, "bench_requests")
            grant(session, balance, 10**12, source_key=f"bench:{customer}", starts_at=utcnow(), expires_at=None)

    # 1. bare single-row inserts, one transaction each
    with db.engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE IF NOT EXISTS bench_bare_inserts "
                "(id BIGSERIAL PRIMARY KEY, event_id TEXT, created_at TIMESTAMPTZ)"
            )
        )
    started = time.perf_counter()
    with db.engine.connect() as connection:
        for n in range(args.events):
            with connection.begin():
                connection.execute(
                    text("INSERT INTO bench_bare_inserts (event_id, created_at) VALUES (:e, now())"),
                    {"e": f"{run}-{n}"},
                )
    bare_rate = args.events / (time.perf_counter() - started)

    # 2. one worker process applying stored events
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dramatiq",
            "workers.actors",
            "--processes",
            "1",
            "--threads",
            "8",
            "--queues",
            actors.USAGE_QUEUE,
        ],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def pending(ids: list[int]) -> int:
            with db.read() as session:
                return int(
                    session.execute(
                        select(func.count())
                        .select_from(UsageEvent)
                        .where(UsageEvent.id.in_(ids), UsageEvent.status == "pending")
                    ).scalar_one()
                )

        def store(customer: str, count: int, prefix: str) -> list[int]:
            now = utcnow()
            events = [
                {"event_id": f"{prefix}-{n}", "customer_id": customer, "event_name": "bench_call"} for n in range(count)
            ]
            return ingest.store_batch(db, ingest.parse_batch({"events": events}, catalogue, now), now)

        warm = store(customers[-1], 10, f"{run}-warm")
        actors.enqueue_usage(warm)
        while pending(warm):  # the worker is up and consuming
            time.sleep(0.05)

        batches = [store(customers[n], args.batch, f"{run}-{n}") for n in range(args.events // args.batch)]
        all_ids = [event_id for batch in batches for event_id in batch]
        started = time.perf_counter()
        for batch in batches:
            actors.enqueue_usage(batch)
        while pending(all_ids):
            time.sleep(0.02)
        applied_rate = len(all_ids) / (time.perf_counter() - started)

        # 3. latency from the ingest answer to the balance showing the deduction
        app = create_app(run_workers=False)
        port = 18731
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.02)
        customer = customers[0]
        latencies: list[float] = []
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {BENCH_TOKEN}"}
        ) as client:
            for n in range(args.latency_samples):
                with db.read() as session:
                    used = session.execute(
                        select(Balance.period_used).where(
                            Balance.customer_id == customer, Balance.entitlement_id == "bench_requests"
                        )
                    ).scalar_one()
                response = client.post(
                    "/events/ingest",
                    json={
                        "events": [{"event_id": f"{run}-lat-{n}", "customer_id": customer, "event_name": "bench_call"}]
                    },
                )
                answered = time.perf_counter()
                assert response.json() == {"ingested_count": 1}, response.text
                while True:
                    with db.read() as session:
                        now_used = session.execute(
                            select(Balance.period_used).where(
                                Balance.customer_id == customer, Balance.entitlement_id == "bench_requests"
                            )
                        ).scalar_one()
                    if now_used > used:
                        break
                    time.sleep(0.001)
                latencies.append((time.perf_counter() - answered) * 1000)
        server.should_exit = True
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    print(f"events: {len(all_ids)} in batches of {args.batch}; one worker process, 8 threads")
    print(f"bare single-row inserts:     {bare_rate:8.0f} /s")
    print(
        f"usage events applied:        {applied_rate:8.0f} /s   (ratio {applied_rate / bare_rate:.2f} of bare inserts)"
    )
    print(
        f"ingest answer -> balance:    p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {percentile(latencies, 0.99):.1f} ms  ({len(latencies)} samples)"
    )


if __name__ == "__main__":
    main()
