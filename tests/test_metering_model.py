"""The real ledger against a simple in-memory model, in the spirit of TigerBeetle's auditor.

Hypothesis drives random credits (some expiring), debits, metered usage events, the passage of time
with the clock's expiry sweep, duplicate API requests, reused keys and redelivered usage events,
applied both to the model and to Tally. After every step the balances agree and the ledger verifies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from metering_support import balance_of, new_customer, post_entry
from sqlalchemy import select

from app.config import get_settings
from app.db import get_database, utcnow
from app.ledger.amounts import format_atoms
from app.ledger.audit import verify
from app.ledger.service import expire_all_due
from app.metering import ingest
from app.metering.models import UsageEvent
from app.metering.service import apply_usage_events
from app.models import Balance

ENTITLEMENT = "tokens"  # precision 2, overage enabled up to 5.00 credits (500 atoms)
PRECISION = 2
OVERAGE_LIMIT = 500
TOKENS_PER_ATOM = 10  # the completion meter: 1000 tokens per credit, so 10 tokens per 0.01


@dataclass
class ModelGrant:
    remaining: int
    expires_at: datetime | None
    expired: bool = False


@dataclass
class Model:
    """What the ledger should hold: grants consumed oldest first, then overage up to the limit."""

    grants: list[ModelGrant] = field(default_factory=list)
    overage: int = 0
    opened: bool = False  # usage is refused until a first API write has opened the balance

    @property
    def balance(self) -> int:
        return sum(grant.remaining for grant in self.grants if not grant.expired)

    def expire(self, now: datetime) -> None:
        for grant in self.grants:
            if not grant.expired and grant.expires_at is not None and grant.expires_at <= now:
                grant.expired, grant.remaining = True, 0

    def credit(self, amount: int, expires_at: datetime | None) -> None:
        self.grants.append(ModelGrant(amount, expires_at))

    def debit(self, amount: int, now: datetime) -> bool:
        """Apply a deduction all or nothing; False when it must be refused."""
        self.expire(now)
        from_balance = min(amount, self.balance)
        if self.overage + amount - from_balance > OVERAGE_LIMIT:
            return False
        self.overage += amount - from_balance
        for grant in self.grants:
            if grant.expired or not from_balance:
                continue
            taken = min(grant.remaining, from_balance)
            grant.remaining -= taken
            from_balance -= taken
        return True


class LedgerAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.db = get_database()
        self.catalogue = get_settings().catalogue
        self.model = Model()
        self.now = utcnow()
        self.customer = ""
        self.requests: list[tuple[dict[str, Any], int, dict[str, Any]]] = []  # body, status, answer
        self.usage_events: list[tuple[dict[str, Any], str]] = []  # event, status

    @initialize()
    def open_customer(self) -> None:
        self.customer = new_customer(self.db, "cus_model")

    def _post(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        extra = {key: value for key, value in body.items() if key not in ("entry_type", "amount", "idempotency_key")}
        answer = post_entry(
            self.db,
            ENTITLEMENT,
            self.customer,
            body["entry_type"],
            body["amount"],
            key=body["idempotency_key"],
            now=self.now,
            **extra,
        )
        self.model.opened = True
        return answer

    @rule(amount=st.integers(1, 2000), expires_in_hours=st.none() | st.integers(1, 12))
    def credit(self, amount: int, expires_in_hours: int | None) -> None:
        expires_at = None if expires_in_hours is None else self.now + timedelta(hours=expires_in_hours)
        body: dict[str, Any] = {
            "entry_type": "credit",
            "amount": format_atoms(amount, PRECISION),
            "idempotency_key": uuid.uuid4().hex,
        }
        if expires_at is not None:
            body["expires_at"] = expires_at.isoformat()
        before = (self.model.balance, self.model.overage)
        status, answer = self._post(body)
        self.model.credit(amount, expires_at)
        assert status == 201, answer
        assert (answer["balance_before"], answer["balance_after"]) == (
            format_atoms(before[0], PRECISION),
            format_atoms(self.model.balance, PRECISION),
        )
        self.requests.append((body, status, answer))

    @rule(amount=st.integers(1, 1500))
    def debit(self, amount: int) -> None:
        body = {"entry_type": "debit", "amount": format_atoms(amount, PRECISION), "idempotency_key": uuid.uuid4().hex}
        status, answer = self._post(body)
        accepted = self.model.debit(amount, self.now)
        assert status == (201 if accepted else 400), answer
        if accepted:
            assert (answer["balance_after"], answer["overage_after"]) == (
                format_atoms(self.model.balance, PRECISION),
                format_atoms(self.model.overage, PRECISION),
            )
        else:
            assert answer["code"] == "limit_exceeded"
        self.requests.append((body, status, answer))

    @rule(atoms=st.integers(1, 1500))
    def usage(self, atoms: int) -> None:
        event = {
            "event_id": f"{self.customer}-{uuid.uuid4().hex[:10]}",
            "customer_id": self.customer,
            "event_name": "completion",
            "metadata": {"tokens": atoms * TOKENS_PER_ATOM},
        }
        real_now = utcnow()
        ids = ingest.store_batch(self.db, ingest.parse_batch({"events": [event]}, self.catalogue, real_now), real_now)
        assert len(ids) == 1
        apply_usage_events(self.db, self.catalogue, ids, now=self.now)
        accepted = self.model.opened and self.model.debit(atoms, self.now)
        status = self._event_status(event["event_id"])
        assert status == ("applied" if accepted else "refused")
        self.usage_events.append((event, status))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def repeat_a_request(self, data: st.DataObject) -> None:
        body, status, answer = data.draw(st.sampled_from(self.requests))
        assert self._post(body) == (status, answer)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def reuse_a_key_with_another_body(self, data: st.DataObject) -> None:
        from app.api.errors import status_for
        from app.metering.entries import IdempotencyConflict

        body, _, _ = data.draw(st.sampled_from(self.requests))
        try:
            self._post({**body, "amount": format_atoms(7777, PRECISION)})
        except IdempotencyConflict as error:
            assert (status_for(error), error.code) == (409, "idempotency_conflict")
        else:
            raise AssertionError("a reused key with a different body was accepted")

    @precondition(lambda self: self.usage_events)
    @rule(data=st.data())
    def redeliver_a_usage_event(self, data: st.DataObject) -> None:
        event, status = data.draw(st.sampled_from(self.usage_events))
        real_now = utcnow()
        assert (
            ingest.store_batch(self.db, ingest.parse_batch({"events": [event]}, self.catalogue, real_now), real_now)
            == []
        )
        with self.db.read() as session:
            stored_id = session.execute(
                select(UsageEvent.id).where(UsageEvent.event_id == event["event_id"])
            ).scalar_one()
        apply_usage_events(self.db, self.catalogue, [stored_id], now=self.now)
        assert self._event_status(event["event_id"]) == status

    @rule(hours=st.integers(1, 8))
    def time_passes_and_the_clock_expires_grants(self, hours: int) -> None:
        self.now += timedelta(hours=hours)
        with self.db.write() as session:
            expire_all_due(session, self.now)
        self.model.expire(self.now)

    def _event_status(self, event_id: str) -> str:
        with self.db.read() as session:
            return session.execute(select(UsageEvent.status).where(UsageEvent.event_id == event_id)).scalar_one()

    @invariant()
    def the_ledger_agrees_with_the_model_and_verifies(self) -> None:
        if not self.customer:
            return
        balance: Balance | None = balance_of(self.db, self.customer, ENTITLEMENT)
        actual = (balance.balance, balance.overage) if balance else (0, 0)
        assert actual == (self.model.balance, self.model.overage)
        with self.db.read() as session:
            assert verify(session) == []


def test_the_ledger_agrees_with_a_model_under_random_operations(db):
    run_state_machine_as_test(
        LedgerAgainstModel,
        settings=settings(
            max_examples=int(os.environ.get("TALLY_MODEL_EXAMPLES", "25")),
            stateful_step_count=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_tally_verify_on_the_command_line_passes_then_reports_a_breach(db):
    customer = new_customer(db)
    post_entry(db, ENTITLEMENT, customer, "credit", "3")
    post_entry(db, ENTITLEMENT, customer, "debit", "4")
    tally = [sys.executable, "-m", "app.cli", "verify"]
    root = Path(__file__).resolve().parent.parent
    passed = subprocess.run(tally, cwd=root, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "ledger verified" in passed.stdout

    with db.write() as session:  # a balance moved without an entry
        row = session.execute(select(Balance).where(Balance.customer_id == customer)).scalar_one()
        row.balance += 1
    breached = subprocess.run(tally, cwd=root, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert breached.returncode == 1
    assert customer in breached.stdout
