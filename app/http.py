"""Shared HTTP plumbing: JSON errors, the body cap, and the app's dependencies on `app.state`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from app.api.auth import Authenticator, Principal
from app.config import Settings
from app.db import Database
from app.errors import ApiError
from app.inbox.store import Enqueue

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024


@dataclass
class Services:
    """What handlers need, built once per app (and swapped by tests for real alternatives)."""

    settings: Settings
    db: Database
    enqueue: Enqueue
    authenticator: Authenticator
    clock: Callable[[], datetime]
    ready_checks: dict[str, Callable[[], None]]


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def authenticate(request: Request) -> Principal:
    """The caller's principal; a token stored in the database is looked up off the event loop."""
    authenticator = services(request).authenticator
    return await run_in_threadpool(authenticator.authenticate, request.headers.get("authorization"))


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, "body_too_large", f"the body must be at most {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body must be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def on_api_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(error.status, error.code, error.message)


async def on_database_unavailable(_request: Request, error: Exception) -> JSONResponse:
    log.error("database unavailable: %s", error)
    return error_response(503, "database_unavailable", "the database is unavailable; retry later")


async def on_unexpected(_request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=error)
    return error_response(500, "internal_error", "something went wrong")


EXCEPTION_HANDLERS = {
    ApiError: on_api_error,
    OperationalError: on_database_unavailable,
    InterfaceError: on_database_unavailable,
    Exception: on_unexpected,
}
