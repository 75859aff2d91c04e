"""The benchmarked web process: Tally's app plus `/bare` GET and POST routes, in one uvicorn process.

    uvicorn bench.server:create_app --factory

`create_app` is Tally's public ASGI factory (`app.web:create_app`, as the Procfile's `web` line runs
it) with one route added, so the bare endpoints run under the same server, event loop, middleware-free
Starlette router and process as Tally's routes: their throughput is the ceiling of this server and
client on this machine, and Tally's figures are divided by it.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.web import create_app as create_tally_app


async def bare(request: Request) -> JSONResponse:
    """POST: reads the body and answers JSON, nothing else. GET: answers JSON."""
    if request.method == "POST":
        await request.body()
        return JSONResponse({"received": True, "duplicate": False})
    return JSONResponse({"status": "ok"})


def create_app() -> Starlette:
    app = create_tally_app()
    app.router.routes.append(Route("/bare", bare, methods=["GET", "POST"], include_in_schema=False))
    return app
