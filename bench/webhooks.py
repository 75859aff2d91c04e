"""Webhooks accepted per second by one web process, next to a bare endpoint on the same server.

    .venv/bin/python bench/webhooks.py [--requests 3000] [--rounds 3] [--concurrency 32]

Runs on PostgreSQL + Redis (BENCH_DATABASE_URL, BENCH_REDIS_URL; defaults: database tally_bench on
127.0.0.1, Redis db 12). One uvicorn process serves both routes; a separate client process sends
pre-signed, distinct Stripe events, alternating rounds between the two routes so that machine noise
hits both alike. The ratio is the figure to compare across machines, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import stripe
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_bench_secret"


def prepare_database(url: str) -> None:
    admin_url, name = url.rsplit("/", 1)
    engine = create_engine(f"{admin_url}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        if not connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()


def signed_bodies(count: int, prefix: str) -> list[tuple[str, str]]:
    now = int(time.time())
    bodies = []
    for n in range(count):
        body = json.dumps(
            {
                "id": f"evt_{prefix}_{n}",
                "object": "event",
                "type": "customer.subscription.updated",
                "created": now,
                "data": {
                    "object": {
                        "id": f"sub_{n}",
                        "object": "subscription",
                        "customer": f"cus_{n}",
                        "status": "active",
                        "items": {"data": [{"price": {"id": "price_123"}}]},
                    }
                },
            }
        )
        bodies.append((body, stripe.WebhookSignature.generate_signature_header(body, SECRET, timestamp=now)))
    return bodies


async def fire(url: str, bodies: list[tuple[str, str]], concurrency: int) -> tuple[float, list[float]]:
    """Send every body; return (seconds, per-request latencies). Any non-200 aborts the run.

    aiohttp, not httpx, on the client side: at this rate httpx's own overhead was the bottleneck.
    """
    latencies: list[float] = []
    pending = list(reversed(bodies))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as client:

        async def run() -> None:
            while pending:
                body, signature = pending.pop()
                started = time.perf_counter()
                async with client.post(
                    url, data=body, headers={"Stripe-Signature": signature, "Content-Type": "application/json"}
                ) as response:
                    text = await response.text()
                latencies.append(time.perf_counter() - started)
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}: {text}")

        started = time.perf_counter()
        await asyncio.gather(*(run() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    database_url = os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/tally_bench")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
    prepare_database(database_url)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "PYTHONPATH": str(ROOT),
    }
    env.pop("BROKER_URL", None)
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, check=True, cwd=ROOT, capture_output=True)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE inbox_events RESTART IDENTITY CASCADE"))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.app:app",
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
    try:
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        results: dict[str, list[tuple[float, list[float]]]] = {"bare": [], "webhook": []}
        asyncio.run(fire(f"{base}/bare", signed_bodies(200, "warm"), args.concurrency))  # warm up both paths
        asyncio.run(fire(f"{base}/webhooks/stripe", signed_bodies(200, "warm"), args.concurrency))
        for round_number in range(args.rounds):
            for name, path in (("bare", "/bare"), ("webhook", "/webhooks/stripe")):
                bodies = signed_bodies(args.requests, f"r{round_number}")
                results[name].append(asyncio.run(fire(base + path, bodies, args.concurrency)))
    finally:
        server.terminate()
        server.wait(timeout=10)

    with engine.begin() as connection:
        stored = connection.execute(text("SELECT count(*) FROM inbox_events WHERE provider_event_id LIKE 'evt_r%'"))
        stored_count = stored.scalar_one()
    engine.dispose()
    expected = args.requests * args.rounds
    print(
        f"{args.rounds} rounds x {args.requests} requests, concurrency {args.concurrency}, one uvicorn process, "
        f"PostgreSQL + Redis"
    )
    rates = {}
    for name, runs in results.items():
        per_round = [args.requests / seconds for seconds, _ in runs]
        latencies = sorted(latency for _, round_latencies in runs for latency in round_latencies)
        rates[name] = statistics.median(per_round)
        print(
            f"  {name:<8} median {rates[name]:7.0f} req/s  (rounds: {', '.join(f'{r:.0f}' for r in per_round)})"
            f"  p50 {latencies[len(latencies) // 2] * 1000:.1f} ms  p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms"
        )
    print(f"  webhook / bare = {rates['webhook'] / rates['bare']:.2f}")
    print(f"  events stored in the inbox: {stored_count} of {expected}")
    return 0 if stored_count == expected else 1


if __name__ == "__main__":
    sys.exit(main())
