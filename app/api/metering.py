"""Routes of usage metering: ingest, synchronous ledger entries, usage history. Thin: logic is in app.metering."""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.auth import Principal
from app.api.pagination import page_from
from app.errors import ApiError
from app.doorbell import ring
from app.http import authenticate, read_body, services
from app.metering import entries, history, ingest
from app.models import Subscription

INGEST_MAX_BODY_BYTES = 4 * 1024 * 1024
"""1000 events with metadata can pass the 1 MiB of other routes."""


def _require_service(principal: Principal) -> None:
    if principal.scope != "service":
        raise ApiError(403, "forbidden", "only service tokens may write usage and ledger entries")


async def _json(request: Request, limit: int | None = None) -> Any:
    body = await read_body(request, limit) if limit else await read_body(request)
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


def enqueue_usage(ids: list[int]) -> None:
    """The workers' doorbell for newly stored usage events (imported late: workers configure the broker)."""
    from workers import actors

    actors.enqueue_usage(ids)


def _ingest(request: Request, payload: Any) -> list[int]:
    app = services(request)
    now = app.clock()
    events = ingest.parse_batch(payload, app.settings.catalogue, now)
    return ingest.store_batch(app.db, events, now)


async def ingest_events(request: Request) -> JSONResponse:
    """
    summary: Report usage events (Dodo's shape); stored before the answer, applied by workers
    requestBody: {content: {application/json: {schema: {type: object, required: [events], properties: {events: {type: array, maxItems: 1000, items: {type: object, required: [event_id, customer_id, event_name], properties: {event_id: {type: string}, customer_id: {type: string}, event_name: {type: string}, timestamp: {type: string, format: date-time}, metadata: {type: object}}}}}}}}}
    responses:
      200: {description: '{"ingested_count": n}, counting events new to Tally'}
      401: {description: missing or unknown token}
      403: {description: not a service token}
      422: {description: a bad event, unknown customer or meter, a duplicate event_id, over 1000 events; nothing stored}
    """
    _require_service(await authenticate(request))
    payload = await _json(request, INGEST_MAX_BODY_BYTES)
    ids = await run_in_threadpool(_ingest, request, payload)
    if ids:
        await run_in_threadpool(ring, enqueue_usage, ids)
    return JSONResponse({"ingested_count": len(ids)})


async def create_ledger_entry(request: Request) -> JSONResponse:
    """
    summary: Credit or debit a Tally-native balance now, once per idempotency_key
    responses:
      201: {description: the entry with balance and overage before and after}
      400: {description: refused by the overage limit, the hard cap or disabled overage (code says which)}
      404: {description: unknown entitlement or customer}
      409: {description: idempotency_key reused with a different body, or a provider-managed entitlement}
      422: {description: a bad amount (negative, zero, not a number, too precise) or body}
    """
    _require_service(await authenticate(request))
    entry_request = entries.parse_entry_request(await _json(request))
    app = services(request)
    status, body = await run_in_threadpool(
        entries.create_ledger_entry,
        app.db,
        app.settings.catalogue,
        entitlement_id=request.path_params["credit_entitlement_id"],
        customer_id=request.path_params["customer_id"],
        request=entry_request,
        now=app.clock(),
    )
    return JSONResponse(body, status_code=status)


def _history(request: Request, principal: Principal) -> dict[str, Any]:
    app = services(request)
    params = request.query_params
    page = page_from(params)
    query = history.HistoryQuery(
        start_date=history.parse_instant(params.get("start_date"), "start_date"),
        end_date=history.parse_instant(params.get("end_date"), "end_date"),
        meter_id=params.get("meter_id") or None,
    )
    subscription_id = request.path_params["subscription_id"]
    with app.db.read() as session:
        subscription = session.get(Subscription, subscription_id)
        if subscription is not None:
            principal.check_customer(subscription.customer_id)
        return history.usage_history(session, app.settings.catalogue, subscription_id, query, page)


async def usage_history(request: Request) -> JSONResponse:
    """
    summary: Usage by billing period and meter of a subscription (seed 001)
    parameters:
      - {name: start_date, in: query, required: false, schema: {type: string, format: date-time}}
      - {name: end_date, in: query, required: false, schema: {type: string, format: date-time}}
      - {name: meter_id, in: query, required: false, schema: {type: string}}
      - {name: page_size, in: query, required: false, schema: {type: integer, maximum: 100}}
      - {name: page_number, in: query, required: false, schema: {type: integer, minimum: 0}}
    responses:
      200: {description: '{"items": [{start_date, end_date, meters: [...]}]}'}
      404: {description: unknown subscription}
      422: {description: a bad filter or page_size over 100}
    """
    principal = await authenticate(request)
    return JSONResponse(await run_in_threadpool(_history, request, principal))


routes = [
    Route("/events/ingest", ingest_events, methods=["POST"]),
    Route(
        "/credit-entitlements/{credit_entitlement_id}/balances/{customer_id}/ledger-entries",
        create_ledger_entry,
        methods=["POST"],
    ),
    Route("/subscriptions/{subscription_id}/usage-history", usage_history, methods=["GET"]),
]
