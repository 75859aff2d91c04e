"""The benchmarked server: Tally's app plus a bare endpoint, so both run in one process under one load."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.web import create_app


async def bare(request: Request) -> JSONResponse:
    """Reads the body and answers, nothing else: the ceiling of this server and client."""
    await request.body()
    return JSONResponse({"received": True, "duplicate": False})


app = create_app(run_workers=False)
app.router.routes.append(Route("/bare", bare, methods=["POST"]))
