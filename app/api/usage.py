"""Thin handlers of the internal API: authenticate, call a read model, answer JSON."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.http import authenticate, services
from app.api.usage_document import read_usage, usage_document


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
    """
    principal = await authenticate(request)
    customer_id = principal.customer_for(request.query_params.get("customer_id"))
    app = services(request)
    row = await read_usage(app.adb, customer_id)
    return JSONResponse(usage_document(row, now=app.clock(), approaching_ratio=app.settings.approaching_limit_ratio))


routes = [Route("/usage", get_usage, methods=["GET"])]
