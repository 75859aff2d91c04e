"""Thin handlers of the credit endpoints: authenticate, check the customer, call a read model.

All on the event loop: no thread hop, the reads run on the async engine.

Dodo-shaped (seeds 000 and 003, and the balance ledger) and OpenRouter-shaped `/credits` (seed 004).
Read models live in `app.api.credit_documents`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.credit_documents import (
    LedgerFilter,
    balance_document,
    credit_usage_document,
    credits_document,
    find_balance,
    ledger_document,
    subscription_customer,
)
from app.api.http import authenticate, services
from app.api.pagination import page_from
from app.api.params import instant_param


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
    adb = services(request).adb
    customer_id = await subscription_customer(adb, subscription_id)
    principal.check_customer(customer_id)
    return JSONResponse(await credit_usage_document(adb, subscription_id, customer_id))


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
    return JSONResponse(balance_document(await find_balance(services(request).adb, customer_id, entitlement_id)))


async def get_balance_ledger(request: Request) -> JSONResponse:
    """
    summary: The ledger entries of a balance, newest first (paginated; transaction_type, start_date, end_date)
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
    params = request.query_params
    page = page_from(params)
    filters = LedgerFilter(
        params.get("transaction_type") or None, instant_param(params, "start_date"), instant_param(params, "end_date")
    )
    return JSONResponse(await ledger_document(services(request).adb, customer_id, entitlement_id, page, filters))


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
    return JSONResponse(await credits_document(services(request).adb, customer_id))


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
