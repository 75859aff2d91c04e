"""Receiving provider webhooks: verify on the exact bytes, store, commit, then enqueue."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import Counter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.errors import ApiError
from app.http import read_body, services
from app.inbox.store import receive_event
from app.providers.dodo.signature import verify_dodo_signature
from app.providers.stripe.signature import verify_stripe_signature

WEBHOOKS = Counter("tally_webhooks_total", "Webhook deliveries by provider and outcome", ["provider", "outcome"])


def _event_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_event", "the body must be a JSON object")
    return payload


async def _accept(request: Request, *, provider: str, event_id: Any, event_type: Any, body: bytes) -> JSONResponse:
    if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str) or not event_type:
        raise ApiError(400, "invalid_event", "the event needs a string id and type")
    app = services(request)
    inbox_event_id = await run_in_threadpool(
        receive_event,
        app.db,
        app.enqueue,
        provider=provider,
        event_id=event_id,
        event_type=event_type,
        body=body.decode("utf-8"),
    )
    if inbox_event_id is None:
        WEBHOOKS.labels(provider, "duplicate").inc()
        return JSONResponse({"received": True, "duplicate": True})
    WEBHOOKS.labels(provider, "stored").inc()
    return JSONResponse({"received": True, "duplicate": False})


async def stripe_webhook(request: Request) -> JSONResponse:
    """
    summary: Receive a Stripe event (snapshot or thin), verified by Stripe-Signature
    responses:
      200: {description: stored (or a duplicate, ignored)}
      400: {description: malformed signature header or body}
      401: {description: signature does not verify, or its timestamp is outside the tolerance}
      413: {description: body over 1 MiB}
      503: {description: database unavailable or no secret configured; Stripe retries}
    """
    app = services(request)
    if not app.settings.stripe_webhook_secrets:
        raise ApiError(503, "not_configured", "STRIPE_WEBHOOK_SECRET is not set")
    body = await read_body(request)
    verify_stripe_signature(
        body,
        request.headers.get("stripe-signature"),
        app.settings.stripe_webhook_secrets,
        tolerance=app.settings.webhook_tolerance_seconds,
    )
    payload = _event_json(body)
    return await _accept(
        request, provider="stripe", event_id=payload.get("id"), event_type=payload.get("type"), body=body
    )


async def dodo_webhook(request: Request) -> JSONResponse:
    """
    summary: Receive a Dodo Payments event, verified by Standard Webhooks headers; deduplicated on webhook-id
    responses:
      200: {description: stored (or a duplicate, ignored)}
      400: {description: missing or malformed webhook-* headers, or a malformed body}
      401: {description: signature does not verify, or webhook-timestamp is outside ±5 minutes}
      413: {description: body over 1 MiB}
      503: {description: database unavailable or no key configured; Dodo retries}
    """
    app = services(request)
    if not app.settings.dodo_webhook_keys:
        raise ApiError(503, "not_configured", "DODO_PAYMENTS_WEBHOOK_KEY is not set")
    body = await read_body(request)
    webhook_id = verify_dodo_signature(
        body, request.headers, app.settings.dodo_webhook_keys, tolerance=app.settings.webhook_tolerance_seconds
    )
    payload = _event_json(body)
    return await _accept(request, provider="dodo", event_id=webhook_id, event_type=payload.get("type"), body=body)


routes = [Route("/webhooks/stripe", stripe_webhook, methods=["POST"])]
routes.append(Route("/webhooks/dodo", dodo_webhook, methods=["POST"]))
