"""Concurrent deductions on one balance: real threads, each on its own database connection.

The limit check runs under the balance's row lock (PostgreSQL) or the write lock (SQLite), so no
interleaving can overshoot the overage limit or lose an update.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from metering_support import balance_of, entry_count, new_customer, post_entry
from sqlalchemy import func, select

from app.api.metering import entry_answer
from app.config import get_settings
from app.db import Database, utcnow
from app.ledger.audit import verify
from app.metering import entries, ingest
from app.metering.models import UsageEvent
from app.metering.service import apply_usage_events
from app.models import Balance, LedgerEntry

THREADS = 64


def _sum_of_entries(db: Database, customer_id: str) -> int:
    with db.read() as session:
        return int(
            session.execute(
                select(func.coalesce(func.sum(LedgerEntry.amount), 0))
                .join(Balance, Balance.id == LedgerEntry.balance_id)
                .where(Balance.customer_id == customer_id)
            ).scalar_one()
        )


def test_64_concurrent_debits_never_pass_the_overage_limit(db):
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "10")[0] == 201  # 10.00 credits, overage limit 5.00
    catalogue = get_settings().catalogue
    own_pool = Database(db.url, pool_size=THREADS)  # one real connection per thread
    start = threading.Barrier(THREADS)

    def debit(n: int) -> tuple[int, dict[str, Any]]:
        request = entries.parse_entry_request({"entry_type": "debit", "amount": "0.25", "idempotency_key": f"d{n}"})
        with own_pool.engine.connect():  # hold a connection of our own while everyone lines up
            start.wait(timeout=60)
        return entry_answer(
            entries.create_ledger_entry(
                own_pool, catalogue, entitlement_id="tokens", customer_id=customer, request=request, now=utcnow()
            )
        )

    try:
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            results = list(pool.map(debit, range(THREADS)))
    finally:
        own_pool.dispose()

    accepted = [body for status, body in results if status == 201]
    refused = [body for status, body in results if status != 201]
    # 64 x 0.25 = 16 wanted; 10 of balance + 5 of overage = 15 possible: exactly 60 fit.
    assert len(accepted) == 60 and len(refused) == 4
    assert {body["code"] for body in refused} == {"limit_exceeded"}
    balance = balance_of(db, customer, "tokens")
    assert (balance.balance, balance.overage) == (0, 500)
    assert balance.overage <= balance.overage_limit
    # No lost update: every accepted debit moved the position by exactly its amount, from a distinct start.
    starts = sorted((body["balance_before"], body["overage_before"]) for body in accepted)
    assert len(set(starts)) == 60
    assert entry_count(db) == 61
    assert _sum_of_entries(db, customer) == balance.balance - balance.overage == 1000 - 60 * 25
    with db.read() as session:
        assert verify(session) == []


def test_workers_applying_overlapping_batches_concurrently_apply_each_event_once(db):
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "10")[0] == 201
    catalogue = get_settings().catalogue
    now = utcnow()
    batch = [
        {
            "event_id": f"{customer}-{n}",
            "customer_id": customer,
            "event_name": "completion",
            "metadata": {"tokens": 250},
        }
        for n in range(THREADS)
    ]
    ids = ingest.store_batch(db, ingest.parse_batch({"events": batch}, catalogue, now), now)
    shuffled = random.Random(7)

    def worker(n: int) -> None:
        mine = shuffled.sample(ids, k=32) if n % 2 else ids  # overlapping redeliveries of the same events
        apply_usage_events(db, catalogue, mine, chunk_size=8)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(worker, range(8)))

    with db.read() as session:
        statuses = dict(session.execute(select(UsageEvent.status, func.count()).group_by(UsageEvent.status)).all())
    assert statuses == {"applied": 60, "refused": 4}
    balance = balance_of(db, customer, "tokens")
    assert (balance.balance, balance.overage) == (0, 500)
    assert entry_count(db, kind="deduction") == 60
    with db.read() as session:
        assert verify(session) == []
