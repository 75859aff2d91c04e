"""Thin handlers of the credit endpoints: authenticate, check the customer, call a read model.

Dodo-shaped (seeds 000 and 003, and the balance ledger) and OpenRouter-shaped `/credits` (seed 004).
Read models live in `app.api.credit_documents`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.auth import Principal
from app.api.credit_documents import (
    LedgerFilter,
    balance_document,
    credit_usage_document,
    credits_document,
    find_balance,
    ledger_document,
)
from app.api.pagination import page_from
from app.errors import ApiError
from app.http import authenticate, services
from app.models import Customer, Subscription


def _date_param(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "invalid_parameter", f"{name} must be an ISO 8601 date or timestamp") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _credit_usage(request: Request, principal: Principal, subscription_id: str) -> dict[str, Any]:
    with services(request).db.read() as session:
        subscription = session.get(Subscription, subscription_id)
        if subscription is None:
            raise ApiError(404, "not_found", f"no subscription {subscription_id!r}")
        principal.check_customer(subscription.customer_id)
        return credit_usage_document(session, subscription)


async def get_credit_usage(request: Request) -> JSONResponse:
    """
    summary: Credit usage of every entitlement of a subscription (seed 000)
    responses:
      200: {description: "{subscription_id, items: [CreditEntitlementUsageStatus]}"}
      401: {description: missing or unknown token}
      403: {description: a customer token asking about another customer's subscription}
      404: {description: unknown subscription}
    """
    principal = await authenticate(request)
    subscription_id = request.path_params["subscription_id"]
    return JSONResponse(await run_in_threadpool(_credit_usage, request, principal, subscription_id))


def _balance(request: Request, entitlement_id: str, customer_id: str, page_request: bool) -> dict[str, Any]:
    page = page_from(request.query_params) if page_request else None
    filters = LedgerFilter(
        request.query_params.get("transaction_type") or None,
        _date_param(request, "start_date"),
        _date_param(request, "end_date"),
    )
    with services(request).db.read() as session:
        balance = find_balance(session, customer_id, entitlement_id)
        if balance is None:
            raise ApiError(
                404, "not_found", f"no balance for customer {customer_id!r} in credit entitlement {entitlement_id!r}"
            )
        if page is None:
            return balance_document(session, balance)
        return ledger_document(session, balance, page, filters)


async def get_balance(request: Request) -> JSONResponse:
    """
    summary: A customer's balance in one credit entitlement (seed 003)
    responses:
      200: {description: CustomerCreditBalance}
      401: {description: missing or unknown token}
      403: {description: a customer token asking about another customer}
      404: {description: no such balance}
    """
    principal = await authenticate(request)
    entitlement_id, customer_id = request.path_params["credit_entitlement_id"], request.path_params["customer_id"]
    principal.check_customer(customer_id)
    return JSONResponse(await run_in_threadpool(_balance, request, entitlement_id, customer_id, False))


async def get_balance_ledger(request: Request) -> JSONResponse:
    """
    summary: The ledger entries of a balance, newest first (page_size, page_number; transaction_type, start_date, end_date)
    responses:
      200: {description: "{items: [CreditLedgerEntry]}"}
      401: {description: missing or unknown token}
      403: {description: a customer token asking about another customer}
      404: {description: no such balance}
      422: {description: a bad page or filter}
    """
    principal = await authenticate(request)
    entitlement_id, customer_id = request.path_params["credit_entitlement_id"], request.path_params["customer_id"]
    principal.check_customer(customer_id)
    return JSONResponse(await run_in_threadpool(_balance, request, entitlement_id, customer_id, True))


def _credits(request: Request, customer_id: str) -> dict[str, Any]:
    with services(request).db.read() as session:
        if session.get(Customer, customer_id) is None:
            raise ApiError(404, "customer_not_found", f"no customer {customer_id!r}")
        return credits_document(session, customer_id)


async def get_credits(request: Request) -> JSONResponse:
    """
    summary: Total credits given and used by a customer (seed 004)
    parameters:
      - {name: customer_id, in: query, required: false, schema: {type: string},
         description: required with a service token; a customer token reads its own customer}
    responses:
      200: {description: "{data: {total_credits, total_usage}}"}
      401: {description: missing or unknown token}
      403: {description: a customer token asking for another customer}
      404: {description: unknown customer}
    """
    principal = await authenticate(request)
    customer_id = principal.customer_for(request.query_params.get("customer_id"))
    return JSONResponse(await run_in_threadpool(_credits, request, customer_id))


routes = [
    Route("/subscriptions/{subscription_id}/credit-usage", get_credit_usage, methods=["GET"]),
    Route("/credit-entitlements/{credit_entitlement_id}/balances/{customer_id}", get_balance, methods=["GET"]),
    Route(
        "/credit-entitlements/{credit_entitlement_id}/balances/{customer_id}/ledger",
        get_balance_ledger,
        methods=["GET"],
    ),
    Route("/credits", get_credits, methods=["GET"]),
]
