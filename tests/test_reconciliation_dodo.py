"""Reconciliation against the fake Dodo API, through the official SDK: gaps filled, drift adjusted."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fakes.dodo_api import DodoFake
from reconciliation_support import assert_verified, deliver, deliver_dodo, entry_count, recon_settings, run
from sqlalchemy import select

from app.db import get_database
from app.ledger.mirror import ensure_provider_entitlement
from app.models import Balance, LedgerEntry, ProviderLedgerEntry, Subscription

ATOMS = 10**10


@pytest.fixture(autouse=True)
def no_proxy_for_the_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def fake() -> Iterator[DodoFake]:
    with DodoFake() as dodo_fake:
        dodo_fake.add_entitlement("cde_calls", overage_enabled=True)
        yield dodo_fake


def balance_of(customer_id: str) -> tuple[int, int]:
    with get_database().read() as session:
        row = session.execute(
            select(Balance).where(Balance.customer_id == customer_id, Balance.entitlement_id == "cde_calls")
        ).scalar_one()
        return row.balance, row.overage


def gaps() -> int:
    with get_database().read() as session:
        return len(session.execute(select(ProviderLedgerEntry).where(ProviderLedgerEntry.follows_gap.is_(True))).all())


def test_a_missed_deduction_in_the_middle_of_the_chain_is_filled_from_the_ledger(fake: DodoFake) -> None:
    settings = recon_settings(dodo_fake=fake)
    deliver_dodo(fake, fake.grant("cus_1", "cde_calls", "1000"))
    [lost] = fake.deduct("cus_1", "cde_calls", "100")
    deliver_dodo(fake, fake.deduct("cus_1", "cde_calls", "50")[0])
    assert gaps() == 1
    assert_verified(notices=True)

    report = run(settings, "dodo")

    assert report["status"] == "succeeded" and report["counts"]["repaired"] == 1
    fields = {(d["field"], d["action"]) for d in report["drifts"]}
    assert ("ledger_entries", "mirrored 1") in fields and ("gap", "gap closed") in fields
    assert gaps() == 0
    assert balance_of("cus_1") == (850 * ATOMS, 0)
    with get_database().read() as session:
        assert session.execute(select(LedgerEntry).where(LedgerEntry.external_id == lost["id"])).scalar_one()
        assert (
            session.execute(select(LedgerEntry).where(LedgerEntry.kind == "reconciliation_adjustment")).first() is None
        )
    before = entry_count()
    assert deliver_dodo(fake, lost) == "processed"  # the late webhook: already mirrored
    assert entry_count() == before
    assert run(settings, "dodo")["counts"]["drifted"] == 0
    assert_verified()


def test_a_balance_no_entry_explains_gets_one_adjustment_and_is_reported(fake: DodoFake) -> None:
    settings = recon_settings(dodo_fake=fake)
    deliver_dodo(fake, fake.grant("cus_1", "cde_calls", "100"))
    fake.set_balance_without_entry("cus_1", "cde_calls", balance="90")

    report = run(settings, "dodo")

    assert [
        (d["object_id"], d["field"], d["tally_value"], d["provider_value"], d["action"])
        for d in report["drifts"]
        if d["field"] == "balance"
    ] == [("cus_1/cde_calls", "balance", "balance 100, overage 0", "balance 90, overage 0", "adjusted")]
    with get_database().read() as session:
        [adjustment] = session.execute(
            select(LedgerEntry).where(LedgerEntry.kind == "reconciliation_adjustment")
        ).scalars()
        assert (adjustment.balance_before, adjustment.balance_after, adjustment.amount) == (
            100 * ATOMS,
            90 * ATOMS,
            -10 * ATOMS,
        )
    assert balance_of("cus_1") == (90 * ATOMS, 0)
    assert_verified()
    assert run(settings, "dodo")["counts"]["drifted"] == 0
    # Dodo's next entry starts where the adjustment left the mirror: no gap.
    deliver_dodo(fake, fake.deduct("cus_1", "cde_calls", "95")[0])
    deliver_dodo(fake, fake.ledger("cus_1", "cde_calls")[-1])
    assert balance_of("cus_1") == (0, 5 * ATOMS) and gaps() == 0
    assert_verified()


def test_dry_run_leaves_the_ledger_as_it_is(fake: DodoFake) -> None:
    settings = recon_settings(dodo_fake=fake)
    deliver_dodo(fake, fake.grant("cus_1", "cde_calls", "100"))
    fake.set_balance_without_entry("cus_1", "cde_calls", balance="90")
    before = entry_count()

    report = run(settings, "dodo", dry_run=True)

    assert {d["action"] for d in report["drifts"]} == {"would adjust"}
    assert entry_count() == before and balance_of("cus_1") == (100 * ATOMS, 0)


def test_more_than_a_hundred_balances_are_paged_by_hand_page_one_included(fake: DodoFake) -> None:
    settings = recon_settings(dodo_fake=fake)
    with get_database().write() as session:
        ensure_provider_entitlement(session, "cde_calls", "dodo")  # Tally mirrors this entitlement
    customers = fake.seed_balances("cde_calls", 150, balance="100", with_entries=True)

    report = run(settings, "dodo")

    pages = [
        dict(call.query).get("page_number")
        for call in fake.log
        if call.path == "/credit-entitlements/cde_calls/balances"
    ]
    assert pages == ["0", "1"]
    assert report["counts"]["checked"] == 150 and report["counts"]["repaired"] == 150
    assert balance_of(customers[120]) == (100 * ATOMS, 0)
    fake.reset_calls()
    second = run(settings, "dodo")
    assert second["counts"]["matched"] == 150 and second["counts"]["drifted"] == 0
    assert second["api_calls"] == 3  # two balance pages and one (empty) subscription page
    assert_verified()


def test_a_subscription_change_that_was_never_delivered_is_repaired(fake: DodoFake) -> None:
    settings = recon_settings(dodo_fake=fake)
    sub = fake.add_subscription("cus_1", cart=[("cde_calls", "1000")], grant=False)
    payload = fake.subscription_webhook_payload(sub["subscription_id"], "subscription.active")
    deliver(get_database(), "dodo", "msg_sub_1", json.dumps(payload))
    fake.update_subscription(sub["subscription_id"], cancel_at_next_billing_date=True)  # no webhook

    report = run(settings, "dodo")

    assert ("cancel_at_period_end", "false", "true", "repaired") in {
        (d["field"], d["tally_value"], d["provider_value"], d["action"]) for d in report["drifts"]
    }
    with get_database().read() as session:
        row = session.get(Subscription, sub["subscription_id"])
        assert row is not None and row.cancel_at_period_end is True
    assert run(settings, "dodo")["counts"]["drifted"] == 0
    assert_verified()
