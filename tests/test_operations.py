"""What operators and orchestrators poll: health, readiness, metrics, and the OpenAPI document."""

from __future__ import annotations

from builders import deliver, event


def test_health_and_readiness(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ok"})


def test_metrics_count_webhooks(http):
    deliver(http, event("evt_metrics", "charge.succeeded", {"id": "ch_1"}))
    deliver(http, event("evt_metrics", "charge.succeeded", {"id": "ch_1"}))
    text = http.get("/metrics").text
    assert 'tally_webhooks_total{outcome="stored",provider="stripe"}' in text
    assert 'tally_webhooks_total{outcome="duplicate",provider="stripe"}' in text


def test_the_openapi_document_lists_the_public_routes(http):
    document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert {"/usage", "/webhooks/stripe"} <= set(document["paths"])
    assert "/metrics" not in document["paths"]
