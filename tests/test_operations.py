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


def test_unknown_routes_and_wrong_methods_answer_in_the_api_error_shape(http):
    missing = http.get("/no/such/route")
    assert (missing.status_code, missing.json()) == (404, {"code": "not_found", "message": "Not Found"})
    wrong = http.delete("/usage")
    assert (wrong.status_code, wrong.json()["code"]) == (405, "method_not_allowed")
