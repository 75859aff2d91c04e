"""Hot balances by batching: concurrent ledger-entry requests on one balance decided in one transaction per batch.

Each request still gets its own entry, before/after and decision in arrival order; the idempotency
rules hold inside a batch and across batches; a request that fails unexpectedly fails alone; across
two web processes the balance's row lock still serialises the batches, so a limit is never passed.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
from conftest import JOBS, LiveServer
from metering_support import balance_of, entry_count, new_customer, post_entry
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.api.errors import status_for
from app.api.metering import entry_answer
from app.config import get_settings
from app.db import Database, utcnow
from app.errors import TallyError
from app.ledger.audit import verify
from app.metering import entries
from app.metering.debits import LedgerEntryBatcher
from app.metering.models import LedgerRequest
from app.models import CreditEntitlement
from app.web import create_app

ROUTE = "/credit-entitlements/{ce}/balances/{customer}/ledger-entries"


def ask(entry_type: str, amount: str, key: str, **extra: Any) -> entries.EntryAsk:
    return entries.EntryAsk(
        entries.parse_entry_request({"entry_type": entry_type, "amount": amount, "idempotency_key": key, **extra}),
        utcnow(),
    )


def decide(db: Database, customer: str, asks: Sequence[entries.EntryAsk], ce: str = "seats") -> list[Any]:
    """A batch decided as the batcher decides it; each answer rendered as the route renders it."""
    answers = entries.create_ledger_entries(
        db, get_settings().catalogue, entitlement_id=ce, customer_id=customer, asks=asks
    )
    return [
        (status_for(answer), answer.code)
        if isinstance(answer, TallyError)
        else answer
        if isinstance(answer, Exception)
        else entry_answer(answer)
        for answer in answers
    ]


def clean(db: Database) -> bool:
    with db.read() as session:
        return verify(session) == []


def batches_observed() -> float:
    return REGISTRY.get_sample_value("tally_ledger_entry_batch_size_count") or 0.0


# --- one batch, decided in order ------------------------------------------------------------------


def test_a_batch_decides_each_request_in_arrival_order_with_its_own_entry_and_idempotency(db):
    customer = new_customer(db)
    past = (utcnow() - timedelta(hours=1)).isoformat()
    answers = decide(
        db,
        customer,
        [
            ask("credit", "5", "c1"),
            ask("debit", "3", "d1"),
            ask("debit", "3", "d2"),  # 2 left: refused, overage disabled
            ask("debit", "3", "d1"),  # the same key and body again: the first decision
            ask("debit", "2", "d1"),  # the same key, another body
            ask("debit", "1.5", "d3"),  # too precise for "seats"
            ask("credit", "1", "c2", expires_at=past),  # expires before it starts
            ask("debit", "2", "d2"),  # the refused key with another body
            ask("debit", "3", "d2"),  # the refused key and body: still refused
            ask("debit", "2", "d4"),
        ],
    )
    credit, first, refused, again, conflict, too_precise, expired, refused_conflict, refused_again, last = answers
    assert credit[0] == 201 and (credit[1]["balance_before"], credit[1]["balance_after"]) == ("0", "5")
    assert first[0] == 201 and (first[1]["balance_before"], first[1]["balance_after"]) == ("5", "2")
    assert refused == (400, {"code": "insufficient_credits", "message": refused[1]["message"]})
    assert again == first
    assert conflict == (409, "idempotency_conflict") == refused_conflict
    assert too_precise == (422, "invalid_amount")
    assert expired == (422, "invalid_request")
    assert refused_again == refused
    assert last[0] == 201 and (last[1]["balance_before"], last[1]["balance_after"]) == ("2", "0")

    balance = balance_of(db, customer, "seats")
    assert (balance.balance, balance.overage, balance.entry_count) == (0, 0, 3)
    with db.read() as session:
        keys = sorted(
            session.execute(
                select(LedgerRequest.idempotency_key).where(LedgerRequest.customer_id == customer)
            ).scalars()
        )
    assert keys == ["c1", "d1", "d2", "d4"]  # decisions only: no record for 4xx answers
    assert clean(db)


def test_the_next_batch_replays_every_decision_a_refusal_included(db):
    customer = new_customer(db)
    first = decide(db, customer, [ask("credit", "2", "c1"), ask("debit", "3", "d1"), ask("debit", "1", "d2")])
    assert [answer[0] for answer in first] == [201, 400, 201]
    second = decide(
        db,
        customer,
        [
            ask("debit", "1", "d2"),
            ask("credit", "10", "c2"),
            ask("debit", "3", "d1"),
            ask("credit", "2", "c1"),
            ask("debit", "4", "d1"),
        ],
    )
    assert second[0] == first[2] and second[2] == first[1] and second[3] == first[0]  # sticky, the refusal too
    assert second[1][0] == 201 and second[4] == (409, "idempotency_conflict")
    assert (balance_of(db, customer, "seats").balance, entry_count(db)) == (11, 3)
    assert clean(db)


def test_what_concerns_the_whole_batch_answers_every_request_and_writes_nothing(db):
    customer = new_customer(db)
    with db.write() as session:
        session.add(
            CreditEntitlement(
                id="cde_dodo_batch",
                managed_by="dodo",
                name="Dodo credits",
                unit="credit",
                precision=2,
                overage_enabled=False,
            )
        )
    batch = [ask("credit", "1", "a"), ask("debit", "1", "b")]
    assert decide(db, "cus_nobody", batch) == [(404, "customer_not_found")] * 2
    assert decide(db, customer, batch, ce="no_such_ce") == [(404, "entitlement_not_found")] * 2
    assert decide(db, customer, batch, ce="cde_dodo_batch") == [(409, "provider_managed")] * 2
    assert decide(db, customer, [ask("credit", "0.5", "a"), ask("debit", "0.25", "b")]) == [(422, "invalid_amount")] * 2
    assert entry_count(db) == 0 and balance_of(db, customer, "seats") is None


def test_a_request_that_raises_unexpectedly_fails_alone_and_the_batch_runs_without_it(db, monkeypatch):
    customer = new_customer(db)
    real_deduct = entries.deduct

    def deduct(session, balance, amount, **kwargs):
        if amount == 7:
            raise RuntimeError("boom")
        return real_deduct(session, balance, amount, **kwargs)

    monkeypatch.setattr(entries, "deduct", deduct)
    answers = decide(
        db,
        customer,
        [ask("credit", "10", "c"), ask("debit", "1", "d1"), ask("debit", "7", "boom"), ask("debit", "2", "d2")],
    )
    assert isinstance(answers[2], RuntimeError)
    assert [(a[0], a[1]["balance_before"], a[1]["balance_after"]) for a in (answers[0], answers[1], answers[3])] == [
        (201, "0", "10"),
        (201, "10", "9"),
        (201, "9", "7"),
    ]
    monkeypatch.setattr(entries, "deduct", real_deduct)
    retried = decide(db, customer, [ask("debit", "7", "boom")])  # nothing was recorded for it: a retry decides
    assert retried[0][0] == 201 and retried[0][1]["balance_after"] == "0"
    assert clean(db)


def test_a_failure_not_tied_to_one_request_splits_the_batch_until_it_is(db, monkeypatch):
    customer = new_customer(db)
    real = entries._decide_one

    def poisoned(session, balance, outcome, now, recorded, new_records):
        decided = real(session, balance, outcome, now, recorded, new_records)
        if outcome.request.idempotency_key == "poison":  # its record refused at the batch's final flush
            new_records[-1].customer_id = "cus_nobody"
        return decided

    monkeypatch.setattr(entries, "_decide_one", poisoned)
    answers = decide(
        db,
        customer,
        [ask("credit", "10", "c"), ask("debit", "1", "d1"), ask("debit", "2", "poison"), ask("debit", "3", "d3")],
    )
    assert isinstance(answers[2], Exception) and not isinstance(answers[2], TallyError)
    assert [(a[1]["balance_before"], a[1]["balance_after"]) for a in (answers[0], answers[1], answers[3])] == [
        ("0", "10"),
        ("10", "9"),
        ("9", "6"),
    ]
    assert (balance_of(db, customer, "seats").balance, entry_count(db)) == (6, 3)
    assert clean(db)


# --- the batcher ----------------------------------------------------------------------------------


def test_requests_queued_while_a_batch_is_in_flight_form_the_next_batch_in_arrival_order():
    release = threading.Event()
    seen: list[list[str]] = []

    def fake_decide(_db, _catalogue, *, entitlement_id, customer_id, asks):
        seen.append([a.request.idempotency_key for a in asks])
        if len(seen) == 1:
            release.wait(timeout=10)
        if any(a.request.idempotency_key == "bad" for a in asks):
            raise RuntimeError("the batch failed")
        return [(entitlement_id, customer_id, a.request.idempotency_key) for a in asks]

    async def scenario() -> None:
        batcher = LedgerEntryBatcher(None, None, decide=fake_decide)
        request = ask("debit", "1", "x").request

        def submit(key: str, customer: str = "cus_1") -> asyncio.Task[Any]:
            return asyncio.create_task(
                batcher.submit("seats", customer, replace(request, idempotency_key=key), utcnow())
            )

        lone = submit("k0")
        while not seen:  # the lone request goes at once: no timer
            await asyncio.sleep(0.001)
        queued = [submit(f"k{n}") for n in range(1, 6)]
        cancelled = submit("gone")
        other_balance = submit("o1", customer="cus_2")  # another balance has its own writer
        await asyncio.sleep(0.05)
        cancelled.cancel()
        assert await other_balance == ("seats", "cus_2", "o1")
        release.set()
        assert await lone == ("seats", "cus_1", "k0")
        assert [await task for task in queued] == [("seats", "cus_1", f"k{n}") for n in range(1, 6)]
        assert seen == [["k0"], ["o1"], ["k1", "k2", "k3", "k4", "k5"]]  # "gone" was never decided

        failing = [submit("bad"), submit("fine")]
        for task in failing:  # a batch that raises: every request of it gets the error
            with pytest.raises(RuntimeError):
                await task
        assert await submit("after") == ("seats", "cus_1", "after")  # the writer lives on
        for _ in range(100):
            if not batcher._lanes:
                break
            await asyncio.sleep(0.01)
        assert batcher._lanes == {}  # idle balances cost nothing
        await batcher.close()

    asyncio.run(scenario())


# --- over HTTP, two web processes -----------------------------------------------------------------


@pytest.fixture
def two_servers(db: Database) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two web apps under uvicorn over the same database, each with its own small pool and batcher."""
    pools = [Database(db.url, pool_size=4), Database(db.url, pool_size=4)]
    try:
        with (
            LiveServer(create_app(db=pools[0], jobs=JOBS, run_workers=False)) as one,
            LiveServer(create_app(db=pools[1], jobs=JOBS, run_workers=False)) as two,
        ):
            yield one, two
    finally:
        for pool in pools:
            pool.dispose()


async def fire(
    servers: Sequence[LiveServer], headers: dict[str, str], ce: str, customer: str, bodies: Sequence[dict[str, Any]]
) -> list[httpx.Response]:
    """All bodies at once, alternating between the servers."""
    clients = [
        httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60, limits=httpx.Limits(max_connections=100))
        for server in servers
    ]
    try:
        path = ROUTE.format(ce=ce, customer=customer)
        return list(
            await asyncio.gather(*(clients[n % len(clients)].post(path, json=body) for n, body in enumerate(bodies)))
        )
    finally:
        for client in clients:
            await client.aclose()


def test_400_concurrent_debits_on_300_credits_across_two_web_processes_accept_exactly_300(
    db, two_servers, service_headers
):
    customer = new_customer(db)
    assert post_entry(db, "seats", customer, "credit", "300")[0] == 201  # overage disabled
    batches_before = batches_observed()
    bodies = [{"entry_type": "debit", "amount": "1", "idempotency_key": f"debit-{n}"} for n in range(400)]
    responses = asyncio.run(fire(two_servers, service_headers, "seats", customer, bodies))

    accepted = [r.json() for r in responses if r.status_code == 201]
    refused = [r.json() for r in responses if r.status_code == 400]
    assert (len(accepted), len(refused)) == (300, 100), {r.status_code for r in responses}
    assert {body["code"] for body in refused} == {"insufficient_credits"}
    # No lost update, no overshoot: every accepted debit started from a distinct balance, 300 down to 1.
    assert sorted(int(body["balance_before"]) for body in accepted) == list(range(1, 301))
    balance = balance_of(db, customer, "seats")
    assert (balance.balance, balance.overage) == (0, 0)
    assert entry_count(db) == 301
    assert clean(db)
    assert batches_observed() - batches_before < 400  # requests were decided together, not one by one

    # Replays across batches and across the two processes: the first decision, a refusal included.
    replays = [bodies[n] for n, r in enumerate(responses) if n % 20 == 0]
    again = asyncio.run(fire(list(reversed(two_servers)), service_headers, "seats", customer, replays))
    firsts = [responses[n] for n in range(0, 400, 20)]
    assert [(r.status_code, r.json()) for r in again] == [(r.status_code, r.json()) for r in firsts]
    assert entry_count(db) == 301
    with db.read() as session:
        assert (
            session.execute(
                select(func.count()).select_from(LedgerRequest).where(LedgerRequest.customer_id == customer)
            ).scalar_one()
            == 401
        )  # and the credit


def test_one_key_sent_many_times_at_once_gets_one_decision(db, two_servers, service_headers):
    customer = new_customer(db)
    assert post_entry(db, "tokens", customer, "credit", "10")[0] == 201
    body = {"entry_type": "debit", "amount": "2.5", "idempotency_key": "once", "reason": "r", "metadata": {"n": 1}}
    responses = asyncio.run(fire(two_servers, service_headers, "tokens", customer, [body] * 30))
    assert {r.status_code for r in responses} == {201}
    assert len({r.text for r in responses}) == 1
    assert balance_of(db, customer, "tokens").balance == 750 and entry_count(db) == 2
    conflict = asyncio.run(fire(two_servers, service_headers, "tokens", customer, [{**body, "amount": "3"}] * 4))
    assert {(r.status_code, r.json()["code"]) for r in conflict} == {(409, "idempotency_conflict")}
    assert clean(db)


def test_the_database_down_answers_every_request_of_the_batch_503(service_headers):
    unreachable = Database("postgresql+psycopg://postgres@127.0.0.1:1/nowhere", pool_size=1)
    with LiveServer(create_app(db=unreachable, jobs=JOBS, run_workers=False)) as server:
        bodies = [{"entry_type": "debit", "amount": "1", "idempotency_key": uuid.uuid4().hex} for _ in range(8)]
        responses = asyncio.run(fire([server], service_headers, "seats", "cus_x", bodies))
    assert {(r.status_code, r.json()["code"]) for r in responses} == {(503, "database_unavailable")}
