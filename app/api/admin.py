"""Admin routes: stored reconciliation runs (service tokens only), paginated like the other lists."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.api.http import authenticate, services
from app.api.pagination import page_from
from app.api.params import invalid_parameter
from app.errors import NotFound
from app.reconciliation.runs import get_run, list_runs


def _runs(request: Request) -> dict[str, Any]:
    page = page_from(request.query_params)
    provider = request.query_params.get("provider") or None
    if provider not in (None, "stripe", "dodo"):
        raise invalid_parameter("provider must be stripe or dodo")
    with services(request).db.read() as session:
        return {"items": list_runs(session, page, provider)}


async def get_runs(request: Request) -> JSONResponse:
    """
    summary: Reconciliation runs, newest first (page_size, page_number, provider)
    responses:
      200: {description: "{items: [ReconciliationRun]}"}
      401: {description: missing or unknown token}
      403: {description: not a service token}
      422: {description: a bad page or provider}
    """
    principal = await authenticate(request)
    principal.require_service()
    return JSONResponse(await run_in_threadpool(_runs, request))


def _run(request: Request, run_id: int) -> dict[str, Any]:
    with services(request).db.read() as session:
        run = get_run(session, run_id)
    if run is None:
        raise NotFound(f"no reconciliation run {run_id}")
    return run


async def get_run_route(request: Request) -> JSONResponse:
    """
    summary: One reconciliation run with its drift
    responses:
      200: {description: ReconciliationRun}
      401: {description: missing or unknown token}
      403: {description: not a service token}
      404: {description: no such run}
    """
    principal = await authenticate(request)
    principal.require_service()
    raw = request.path_params["run_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"no reconciliation run {raw!r}")
    return JSONResponse(await run_in_threadpool(_run, request, int(raw)))


routes = [
    Route("/admin/reconciliation/runs", get_runs, methods=["GET"]),
    Route("/admin/reconciliation/runs/{run_id}", get_run_route, methods=["GET"]),
]
