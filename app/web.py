"""The Starlette application: webhook receivers, the internal API, health, metrics and OpenAPI."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from app.api import admin as admin_routes
from app.api import credits as credit_routes
from app.api import metering as metering_routes
from app.api import usage as usage_routes
from app.api import webhooks
from app.api.auth import Authenticator
from app.api.http import EXCEPTION_HANDLERS, Services, services
from app.config import Settings, get_settings
from app.db import AsyncDatabase, Database, get_database, table_of, utcnow
from app.doorbell import ring
from app.group_commit import GroupCommit
from app.metering.models import UsageEvent
from app.models import InboxEvent
from app.queue import build_broker, ping, start_inprocess_worker
from app.tasks import Jobs, declare_jobs, start_clock_in_background

log = logging.getLogger(__name__)

schemas = SchemaGenerator({"openapi": "3.0.0", "info": {"title": "Tally", "version": "0.1.0"}})


async def healthz(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Ready when the database and the broker answer."""
    failures: dict[str, str] = {}
    for name, check in services(request).ready_checks.items():
        try:
            await run_in_threadpool(check)
        except Exception as error:  # any client error means "not ready"
            failures[name] = str(error).splitlines()[0] if str(error) else type(error).__name__
    if failures:
        return JSONResponse({"status": "unavailable", "failures": failures}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(_request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(schemas.get_schema(routes=request.app.routes))


def database_check(db: Database) -> Callable[[], None]:
    def check() -> None:
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    return check


def create_app(
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    jobs: Jobs | None = None,
    clock: Callable[[], datetime] = utcnow,
    run_workers: bool | None = None,
) -> Starlette:
    """Build the app. With the in-process broker it also runs the workers and the clock itself."""
    settings = settings or get_settings()
    db = db or get_database()
    jobs = jobs or declare_jobs(build_broker(settings), settings, db)
    if run_workers is None:
        run_workers = settings.broker_kind == "inprocess"

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # Handlers run their database work in threads: no more threads than pooled connections, or
        # the surplus opens and closes a connection per request.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.db_pool_size
        worker = scheduler = None
        if run_workers:
            worker = start_inprocess_worker(jobs.broker, settings.worker_threads)
            scheduler = start_clock_in_background(jobs, settings.reconcile_at)
            log.info(
                "in-process broker: %s worker threads and the clock run inside this process", settings.worker_threads
            )
        try:
            yield
        finally:
            await app_services.inbox_intake.close()
            await app_services.usage_intake.close()
            await app_services.adb.dispose()
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            if worker is not None:
                worker.stop()

    app = Starlette(
        routes=[
            *webhooks.routes,
            *usage_routes.routes,
            *credit_routes.routes,
            *metering_routes.routes,
            *admin_routes.routes,
            Route("/healthz", healthz, include_in_schema=False),
            Route("/readyz", readyz, include_in_schema=False),
            Route("/metrics", metrics, include_in_schema=False),
            Route("/openapi.json", openapi, include_in_schema=False),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    adb = AsyncDatabase(db.url, pool_size=settings.db_pool_size)

    async def ring_events(ids: list[int]) -> None:
        await anyio.to_thread.run_sync(ring, jobs.enqueue_events, ids)

    async def ring_usage(ids: list[int]) -> None:
        await anyio.to_thread.run_sync(ring, jobs.enqueue_usage, ids)

    app_services = app.state.services = Services(
        settings=settings,
        db=db,
        adb=adb,
        inbox_intake=GroupCommit(adb, table_of(InboxEvent), ("provider", "provider_event_id"), ring=ring_events),
        usage_intake=GroupCommit(adb, table_of(UsageEvent), ("event_id",), ring=ring_usage),
        enqueue_event=jobs.enqueue_event,
        enqueue_usage=jobs.enqueue_usage,
        authenticator=Authenticator(db, settings.api_keys),
        clock=clock,
        ready_checks={"database": database_check(db), "broker": lambda: ping(jobs.broker)},
    )
    return app
