"""Reconciliation runs: faults, the command, the admin API, and the nightly schedule."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from conftest import JOBS
from fakes.dodo_api import DodoFake
from fakes.stripe_api import StripeFake
from reconciliation_support import assert_verified, deliver_stripe, entry_count, recon_settings, run
from sqlalchemy import select

from app.cli import parser
from app.db import get_database
from app.keys import create_key
from app.reconciliation.limits import RateLimiter
from app.reconciliation.models import ReconciliationRun
from app.reconciliation.service import reconcile_scheduled
from app.tasks import schedule


@pytest.fixture(autouse=True)
def no_proxy_for_the_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def fake() -> Iterator[StripeFake]:
    with StripeFake() as stripe_fake:
        yield stripe_fake


def tally_reconcile(settings: object, *argv: str) -> int:
    args = parser().parse_args(["reconcile", *argv])
    return int(args.run(settings, args))


def test_a_429_with_retry_after_is_waited_out_then_the_run_succeeds(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    fake.create_subscription("cus_1", price="price_123")
    fake.fail_next(1, status=429, retry_after=1, path_prefix="/v1/subscriptions")

    started = time.monotonic()
    report = run(settings, "stripe")

    assert time.monotonic() - started >= 1.0
    assert report["status"] == "succeeded" and report["counts"]["repaired"] == 1
    assert report["api_calls"] == 3  # events, the refused list, the list again
    assert_verified()


def test_a_provider_down_for_the_whole_run_is_stored_as_failed_and_exits_non_zero(
    fake: StripeFake, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = recon_settings(fake)
    fake.create_subscription("cus_1", price="price_123")
    deliver_stripe(fake, fake.last_event()["id"])
    fake.update_subscription(fake.last_event()["data"]["object"]["id"], cancel_at_period_end=True)
    before = entry_count()
    fake.down()

    code = tally_reconcile(settings, "--provider", "stripe", "--json")

    assert code == 1
    stored = json.loads(capsys.readouterr().out)
    assert stored["status"] == "failed" and stored["finished_at"] is not None
    assert "failed after 3 attempt(s)" in stored["error"] and stored["api_calls"] == 3
    assert entry_count() == before
    assert_verified()
    fake.up()
    assert tally_reconcile(settings, "--provider", "stripe") == 0


def test_a_5xx_is_retried_and_a_provider_without_a_key_is_skipped(
    fake: StripeFake, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = recon_settings(fake)
    fake.fail_next(2, status=503)

    assert tally_reconcile(settings) == 0

    out = capsys.readouterr().out
    assert "dodo: skipped, DODO_PAYMENTS_API_KEY is not set" in out
    assert "stripe: succeeded" in out and "api calls 4" in out


def test_report_shows_a_stored_run_as_json_and_as_a_summary(
    fake: StripeFake, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = recon_settings(fake)
    fake.create_subscription("cus_1", price="price_123")
    first = run(settings, "stripe")
    capsys.readouterr()

    assert tally_reconcile(settings, "--report", str(first["id"]), "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == first
    assert set(shown) == {
        "id", "provider", "dry_run", "status", "started_at", "finished_at", "error", "counts", "api_calls", "drifts"
    }  # fmt: skip
    assert tally_reconcile(settings, "--report") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"run {first['id']} stripe: succeeded; checked 1")
    assert any("exists: tally=missing provider=active -> created" in line for line in lines[1:])


def test_the_admin_api_lists_runs_for_service_tokens_only(
    fake: StripeFake, http: httpx.Client, service_headers: dict[str, str]
) -> None:
    settings = recon_settings(fake)
    fake.create_subscription("cus_1", price="price_123")
    first, second = run(settings, "stripe"), run(settings, "stripe")

    listed = http.get("/admin/reconciliation/runs", params={"page_size": 1}, headers=service_headers)
    assert listed.status_code == 200 and listed.json() == {"items": [second]}
    page_two = http.get("/admin/reconciliation/runs?page_size=1&page_number=1", headers=service_headers).json()
    assert page_two == {"items": [first]}
    one = http.get(f"/admin/reconciliation/runs/{first['id']}", headers=service_headers)
    assert one.json() == first
    assert http.get("/admin/reconciliation/runs/999999", headers=service_headers).status_code == 404
    customer = create_key(get_database(), scope="customer", customer_id="cus_1")
    assert http.get("/admin/reconciliation/runs", headers={"Authorization": f"Bearer {customer}"}).status_code == 403
    assert http.get("/admin/reconciliation/runs").status_code == 401


def test_two_scheduled_jobs_for_the_same_provider_and_date_run_once(fake: StripeFake) -> None:
    settings = recon_settings(fake)
    with DodoFake() as dodo:
        settings = recon_settings(fake, dodo)
        fake.create_subscription("cus_1", price="price_123")
        barrier = threading.Barrier(2)
        outcomes = []

        def fire() -> None:
            barrier.wait()
            outcomes.append(reconcile_scheduled(get_database(), settings, "2026-12-03"))

        threads = [threading.Thread(target=fire) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        again = reconcile_scheduled(get_database(), settings, "2026-12-03")  # the message delivered twice

    with get_database().read() as session:
        runs = session.execute(select(ReconciliationRun.provider, ReconciliationRun.scheduled_for)).all()
    assert sorted(runs) == [("dodo", "2026-12-03"), ("stripe", "2026-12-03")]
    assert sum(len(outcome.run_ids) for outcome in outcomes) == 2
    assert again.run_ids == [] and len(again.notes) == 2
    assert fake.calls_to("/v1/subscriptions") == 1  # one run listed Stripe's subscriptions
    assert len(run(settings, "stripe")["drifts"]) == 0  # a manual run is always allowed
    assert_verified()


def test_the_clock_schedules_the_nightly_run_at_the_configured_time() -> None:
    scheduler = schedule(BackgroundScheduler(timezone="UTC"), JOBS, "04:30")
    trigger = scheduler.get_job("reconcile").trigger
    fields = {field.name: str(field) for field in trigger.fields}
    assert (fields["hour"], fields["minute"]) == ("4", "30")


def test_the_rate_limiter_spaces_requests() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(20, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.acquire()
    assert now[0] == pytest.approx(0.2) and len(slept) == 4
