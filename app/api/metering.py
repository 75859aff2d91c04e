"""Routes of usage metering: ingest, synchronous ledger entries, usage history. Thin: logic is in app.metering."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.auth import Principal
from app.api.http import authenticate, read_json, services
from app.api.pagination import page_from
from app.api.params import instant_param
from app.errors import Forbidden
from app.ledger.amounts import format_atoms
from app.metering import entries, history, ingest
from app.models import Subscription
from app.times import render_instant

INGEST_MAX_BODY_BYTES = 4 * 1024 * 1024
"""1000 events with metadata can pass the 1 MiB of other routes."""


def _require_service(principal: Principal) -> None:
    if principal.scope != "service":
        raise Forbidden("only service tokens may write usage and ledger entries")


async def ingest_events(request: Request) -> JSONResponse:
    """
    summary: Report usage events (Dodo's shape); stored before the answer, applied by workers
    requestBody:
      content:
        application/json:
          schema:
            type: object
            required: [events]
            properties:
              events:
                type: array
                maxItems: 1000
                items:
                  type: object
                  required: [event_id, customer_id, event_name]
                  properties:
                    event_id: {type: string}
                    customer_id: {type: string}
                    event_name: {type: string}
                    timestamp: {type: string, format: date-time}
                    metadata: {type: object}
    responses:
      200: {description: '{"ingested_count": n}, counting events new to Tally'}
      401: {description: missing or unknown token}
      403: {description: not a service token}
      422: {description: a bad event, unknown customer or meter, a duplicate event_id, over 1000 events; nothing stored}
    """
    _require_service(await authenticate(request))
    payload = await read_json(request, INGEST_MAX_BODY_BYTES)
    app = services(request)
    now = app.clock()
    events = ingest.parse_batch(payload, app.settings.catalogue, now)
    await ingest.check_customers(app.adb, events)
    ids = await app.usage_intake.submit(ingest.rows_for(events, now))  # rings the workers itself
    return JSONResponse({"ingested_count": sum(1 for new_id in ids if new_id is not None)})


def entry_answer(outcome: entries.EntryOutcome) -> tuple[int, dict[str, Any]]:
    """The status and body of a decision: Dodo's BalanceCreateLedgerEntryResponse, or the refusal."""
    if outcome.entry is None:
        return 400, {"code": outcome.refusal_code, "message": outcome.refusal_message}
    entry, request, precision = outcome.entry, outcome.request, outcome.entitlement.precision
    return 201, {
        "id": str(entry.id),
        "amount": format_atoms(outcome.atoms, precision),
        "balance_before": format_atoms(entry.balance_before, precision),
        "balance_after": format_atoms(entry.balance_after, precision),
        "overage_before": format_atoms(entry.overage_before, precision),
        "overage_after": format_atoms(entry.overage_after, precision),
        "created_at": render_instant(entry.created_at),
        "credit_entitlement_id": outcome.entitlement.id,
        "customer_id": outcome.customer_id,
        "entry_type": request.entry_type,
        "is_credit": request.entry_type == "credit",
        "metadata": request.metadata,
        "grant_id": str(entry.grant_id) if entry.grant_id is not None else None,
        "reason": request.reason,
    }


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
    entry_request = entries.parse_entry_request(await read_json(request))
    app = services(request)
    outcome = await run_in_threadpool(
        entries.create_ledger_entry,
        app.db,
        app.settings.catalogue,
        entitlement_id=request.path_params["credit_entitlement_id"],
        customer_id=request.path_params["customer_id"],
        request=entry_request,
        now=app.clock(),
    )
    status, body = entry_answer(outcome)
    return JSONResponse(body, status_code=status)


def _history(request: Request, principal: Principal) -> dict[str, Any]:
    app = services(request)
    params = request.query_params
    page = page_from(params)
    query = history.HistoryQuery(
        start_date=instant_param(params, "start_date"),
        end_date=instant_param(params, "end_date"),
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
