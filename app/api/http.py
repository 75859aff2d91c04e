"""Shared HTTP plumbing: the app's dependencies, the body cap, and errors as JSON."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from app.api.auth import Authenticator, Principal
from app.api.errors import status_for
from app.config import Settings
from app.db import AsyncDatabase, Database
from app.errors import Malformed, TallyError, TooLarge
from app.group_commit import GroupCommit
from app.metering.debits import LedgerEntryBatcher

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024


@dataclass
class Services:
    """What handlers need, built once per app; tests build it with real alternatives."""

    settings: Settings
    db: Database
    adb: AsyncDatabase
    inbox_intake: GroupCommit
    usage_intake: GroupCommit
    ledger_entries: LedgerEntryBatcher
    enqueue_event: Callable[[int], None]
    enqueue_usage: Callable[[list[int]], None]
    authenticator: Authenticator
    clock: Callable[[], datetime]
    ready_checks: dict[str, Callable[[], None]]


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


async def authenticate(request: Request) -> Principal:
    """The caller's principal, on the event loop: stored tokens come from a cache refreshed on the async engine."""
    app = services(request)
    return await app.authenticator.authenticate(request.headers.get("authorization"), app.adb)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise TooLarge(f"the body must be at most {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body must be at most {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """The request's JSON, parsed once, here."""
    try:
        return json.loads(body)
    except ValueError:
        raise Malformed("the body is not valid JSON", code="invalid_json") from None


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    return parse_json(await read_body(request, limit))


async def on_tally_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, TallyError)
    return error_response(status_for(error), error.code, error.message)


async def on_http_exception(_request: Request, error: Exception) -> JSONResponse:
    """Starlette's own 404 and 405, in the API's error shape."""
    assert isinstance(error, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return error_response(error.status_code, code, str(error.detail))


async def on_database_unavailable(_request: Request, error: Exception) -> JSONResponse:
    log.error("database unavailable: %s", error)
    return error_response(503, "database_unavailable", "the database is unavailable; retry later")


async def on_unexpected(_request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=error)
    return error_response(500, "internal_error", "something went wrong")


EXCEPTION_HANDLERS = {
    TallyError: on_tally_error,
    HTTPException: on_http_exception,
    OperationalError: on_database_unavailable,
    InterfaceError: on_database_unavailable,
    Exception: on_unexpected,
}
