"""Ledger-entry requests on one balance decided in one transaction per batch.

Each request still gets its own entry, before/after and decision in arrival order; the idempotency
rules hold inside a batch and across batches; a request that fails unexpectedly fails alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from metering_support import balance_of, entry_count, new_customer
from sqlalchemy import select

from app.api.errors import status_for
from app.api.metering import entry_answer
from app.config import get_settings
from app.db import Database, utcnow
from app.errors import TallyError
from app.ledger.audit import verify
from app.metering import entries
from app.metering.models import LedgerRequest
from app.models import CreditEntitlement


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
