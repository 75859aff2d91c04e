"""Thin handlers of the internal API: authenticate, call a read model, answer JSON."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.usage import usage_document
from app.errors import ApiError
from app.http import authenticate, services
from app.models import Customer


def _usage(request: Request, customer_id: str) -> dict:
    app = services(request)
    with app.db.read() as session:
        if session.get(Customer, customer_id) is None:
            raise ApiError(404, "customer_not_found", f"no customer {customer_id!r}")
        return usage_document(
            session, customer_id, now=app.clock(), approaching_ratio=app.settings.approaching_limit_ratio
        )


async def get_usage(request: Request) -> JSONResponse:
    """
    summary: The plan, billing period and credits of a customer (seed 002)
    parameters:
      - {name: customer_id, in: query, required: false, schema: {type: string},
         description: required with a service token; a customer token reads its own customer}
    responses:
      200: {description: the usage document}
      401: {description: missing or unknown token}
      403: {description: a customer token asking for another customer}
      404: {description: unknown customer}
    """
    principal = await authenticate(request)
    customer_id = principal.customer_for(request.query_params.get("customer_id"))
    return JSONResponse(await run_in_threadpool(_usage, request, customer_id))


routes = [Route("/usage", get_usage, methods=["GET"])]
