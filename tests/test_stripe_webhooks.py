"""Receiving Stripe webhooks over real HTTP: only a valid signature stores anything."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from builders import deliver, event, sign, subscription_object
from conftest import JOBS, STRIPE_OLD_SECRET, STRIPE_SECRET, LiveServer
from sqlalchemy import func, select

from app.config import get_settings
from app.db import Database
from app.models import InboxEvent
from app.web import create_app


def inbox_count(db: Database) -> int:
    with db.read() as session:
        return int(session.execute(select(func.count()).select_from(InboxEvent)).scalar_one())


def a_body(event_id: str = "evt_sig") -> str:
    now = int(time.time())
    return json.dumps(
        event(
            event_id,
            "customer.subscription.updated",
            subscription_object("sub_sig", "cus_sig", "active", now, now + 3600),
        )
    )


def post(http: httpx.Client, body: str | bytes, signature: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return http.post("/webhooks/stripe", content=body, headers=headers)


def test_a_valid_signature_stores_the_event(db, http):
    body = a_body()
    response = post(http, body, sign(body))
    assert response.status_code == 200
    assert response.json() == {"received": True, "duplicate": False}
    with db.read() as session:
        stored = session.execute(select(InboxEvent)).scalar_one()
    assert (stored.provider, stored.provider_event_id, stored.type, stored.status) == (
        "stripe",
        "evt_sig",
        "customer.subscription.updated",
        "pending",
    )
    assert stored.body == body  # the exact bytes, for audit and replay


def test_a_rotated_out_secret_still_verifies_during_the_roll(db, http):
    body = a_body()
    assert post(http, body, sign(body, STRIPE_OLD_SECRET)).status_code == 200
    assert inbox_count(db) == 1


def test_several_v1_signatures_pass_when_any_matches(db, http):
    body = a_body()
    now = int(time.time())
    good = sign(body, timestamp=now).split(",")[1]
    header = f"t={now},v1={'0' * 64},{good}"
    assert post(http, body, header).status_code == 200
    assert inbox_count(db) == 1


def _future(body: str) -> str:
    return sign(body, timestamp=int(time.time()) + 3600)


def _stale(body: str) -> str:
    return sign(body, timestamp=int(time.time()) - 301)


def _v0_only(body: str) -> str:
    return sign(body).replace("v1=", "v0=")


@pytest.mark.parametrize(
    ("case", "signature_for", "status", "code"),
    [
        ("wrong secret", lambda body: sign(body, "whsec_somebody_else"), 401, "invalid_signature"),
        ("tampered body", lambda body: sign(body.replace("active", "canceled")), 401, "invalid_signature"),
        ("stale timestamp", _stale, 401, "stale_signature"),
        ("future timestamp", _future, 401, "stale_signature"),
        ("missing header", lambda body: None, 400, "missing_signature"),
        ("empty header", lambda body: "", 400, "missing_signature"),
        ("garbage header", lambda body: "not a signature at all", 400, "malformed_signature"),
        ("non-numeric timestamp", lambda body: "t=yesterday,v1=abc", 400, "malformed_signature"),
        ("v0 only", _v0_only, 400, "malformed_signature"),
    ],
)
def test_a_bad_signature_is_refused_and_stores_nothing(db, http, case, signature_for, status, code):
    body = a_body()
    response = post(http, body, signature_for(body))
    assert response.status_code == status, case
    assert response.json()["code"] == code
    assert set(response.json()) == {"code", "message"}
    assert inbox_count(db) == 0


def test_signed_garbage_is_refused_clearly(db, http):
    for body, code in [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_event"),
        (json.dumps({"type": "x"}), "invalid_event"),
    ]:
        response = post(http, body, sign(body))
        assert (response.status_code, response.json()["code"]) == (400, code)
    raw = b'{"id": "evt_\xff"}'
    response = http.post("/webhooks/stripe", content=raw, headers={"Stripe-Signature": f"t={int(time.time())},v1=00"})
    assert (response.status_code, response.json()["code"]) == (400, "invalid_body")
    assert inbox_count(db) == 0


def test_a_body_over_one_mebibyte_is_refused_before_it_is_read(db, http):
    body = json.dumps({"id": "evt_big", "type": "x", "pad": "a" * (1024 * 1024)})
    response = post(http, body, sign(body))
    assert (response.status_code, response.json()["code"]) == (413, "body_too_large")
    assert inbox_count(db) == 0


def test_unknown_and_thin_events_are_stored_and_acknowledged(db, http):
    unknown = {
        "id": "evt_unknown",
        "object": "event",
        "type": "radar.early_fraud_warning.created",
        "created": int(time.time()),
        "data": {"object": {}},
    }
    thin = {
        "id": "evt_thin",
        "object": "v2.core.event",
        "type": "v1.billing.meter.no_meter_found",
        "created": "2026-11-22T03:00:00.000Z",
        "related_object": None,
    }
    assert deliver(http, unknown).status_code == 200
    assert deliver(http, thin).status_code == 200
    assert inbox_count(db) == 2


def test_twenty_parallel_deliveries_of_one_event_store_it_once(db, http):
    body = a_body("evt_parallel")
    signature = sign(body)
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda _: post(http, body, signature), range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert sum(not r.json()["duplicate"] for r in responses) == 1
    assert inbox_count(db) == 1


def test_database_down_answers_503_so_the_provider_retries(db):
    dead = Database("postgresql+psycopg://postgres@127.0.0.1:1/test")
    app = create_app(get_settings(), db=dead, jobs=JOBS, run_workers=False)
    with LiveServer(app) as live, httpx.Client(base_url=live.url) as client:
        body = a_body()
        response = post(client, body, sign(body))
    assert response.status_code == 503
    assert response.json()["code"] == "database_unavailable"


def test_no_secret_configured_answers_503_not_500(db):
    app = create_app(get_settings().model_copy(update={"stripe_webhook_secrets": ()}), jobs=JOBS, run_workers=False)
    with LiveServer(app) as live, httpx.Client(base_url=live.url) as client:
        body = a_body()
        response = post(client, body, sign(body, STRIPE_SECRET))
    assert (response.status_code, response.json()["code"]) == (503, "not_configured")
    assert inbox_count(db) == 0
