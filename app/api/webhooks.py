"""Receiving provider webhooks: verify on the exact bytes, store, commit, then enqueue."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.http import parse_json, read_body, services
from app.errors import Malformed, Unavailable
from app.providers.dodo.signature import verify_dodo_signature
from app.providers.stripe.signature import verify_stripe_signature
from app.times import utcnow
from app.validation import MAX_ID_LENGTH, storable

WEBHOOKS = Counter("tally_webhooks_total", "Webhook deliveries by provider and outcome", ["provider", "outcome"])


def _event_json(body: bytes) -> dict[str, Any]:
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise Malformed("the body must be a JSON object", code="invalid_event")
    return payload


async def _accept(request: Request, *, provider: str, event_id: Any, event_type: Any, body: bytes) -> JSONResponse:
    if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str) or not event_type:
        raise Malformed("the event needs a string id and type", code="invalid_event")
    for name, value in (("id", event_id), ("type", event_type)):
        if len(value) > MAX_ID_LENGTH:
            raise Malformed(f"the event's {name} is longer than {MAX_ID_LENGTH} characters", code="invalid_event")
        try:
            storable(value)
        except ValueError as error:
            raise Malformed(f"the event's {name} {error}", code="invalid_event") from None
    row = {
        "provider": provider,
        "provider_event_id": event_id,
        "type": event_type,
        "body": body.decode("utf-8"),
        "received_at": utcnow(),
        "status": "pending",
        "attempts": 0,
    }
    [inbox_event_id] = await services(request).inbox_intake.submit([row])
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
        raise Unavailable("STRIPE_WEBHOOK_SECRET is not set", code="not_configured")
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
        raise Unavailable("DODO_PAYMENTS_WEBHOOK_KEY is not set", code="not_configured")
    body = await read_body(request)
    webhook_id = verify_dodo_signature(
        body, request.headers, app.settings.dodo_webhook_keys, tolerance=app.settings.webhook_tolerance_seconds
    )
    payload = _event_json(body)
    return await _accept(request, provider="dodo", event_id=webhook_id, event_type=payload.get("type"), body=body)


routes = [
    Route("/webhooks/stripe", stripe_webhook, methods=["POST"]),
    Route("/webhooks/dodo", dodo_webhook, methods=["POST"]),
]
