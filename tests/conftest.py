"""Test wiring: real databases, real brokers, a real HTTP server.

`scripts/test` runs this suite once per profile by setting DATABASE_URL and REDIS_URL/BROKER_URL;
run alone, pytest uses the embedded default (a SQLite file in a temporary folder, in-process broker).
The settings are read once per process, so they are fixed here before any `app` module is imported.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
_tmp = tempfile.mkdtemp(prefix="tally-tests-")
os.environ.setdefault("DATABASE_URL", f"sqlite:///{_tmp}/tally.db")
os.environ.update(
    {
        "STRIPE_WEBHOOK_SECRET": "whsec_old_rotated_secret,whsec_current_test_secret",
        "TALLY_API_KEYS": "test-service-token-0123456789",
        "TALLY_PLANS": str(HERE / "fixtures" / "plans.toml"),
        "TALLY_MAX_ATTEMPTS": "4",
        "TALLY_RETRY_MIN_BACKOFF_MS": "20",
        "TALLY_RETRY_MAX_BACKOFF_MS": "100",
        "TALLY_SWEEP_AFTER_SECONDS": "1",
    }
)

import dramatiq  # noqa: E402
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from sqlalchemy import text  # noqa: E402

from app.cli import migrate  # noqa: E402
from app.config import get_settings  # noqa: E402
from app.db import Database, get_database  # noqa: E402
from app.models import Base  # noqa: E402
from app.queue import build_broker  # noqa: E402
from app.tasks import declare_jobs  # noqa: E402
from app.web import create_app  # noqa: E402

JOBS = declare_jobs(build_broker(get_settings()), get_settings(), get_database())
"""The suite's actors and doorbells on the configured broker: every app and worker in a test shares them."""

SERVICE_TOKEN = "test-service-token-0123456789"
STRIPE_SECRET = "whsec_current_test_secret"
STRIPE_OLD_SECRET = "whsec_old_rotated_secret"
DODO_KEY = "whsec_dGFsbHktZG9kby1jdXJyZW50LXRlc3Qta2V5LTAxMjM0NTY3"
DODO_OLD_KEY = "whsec_dGFsbHktZG9kby1vbGQtcm90YXRlZC1rZXktNzY1NDMyMTA="


def is_postgres() -> bool:
    return get_settings().database_url.startswith("postgresql")


def _reset_schema(db: Database) -> None:
    """Start every run from an empty database that only the migrations have shaped."""
    if db.is_sqlite:
        path = Path(db.url.removeprefix("sqlite:///"))
        db.dispose()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        with db.engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
        db.dispose()
    migrate(get_settings())


@pytest.fixture(scope="session")
def db() -> Iterator[Database]:
    database = get_database()
    _reset_schema(database)
    if get_settings().broker_kind == "redis":
        JOBS.broker.client.flushdb()
    elif get_settings().broker_kind == "rabbitmq":
        for queue in JOBS.broker.get_declared_queues():
            JOBS.broker.flush(queue)
    yield database
    database.dispose()


@pytest.fixture(autouse=True)
def clean_tables(db: Database) -> Iterator[None]:
    """Empty every table and queue after each test, so no test sees another's rows or messages."""
    yield
    JOBS.broker.flush_all()
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with db.engine.begin() as connection:
        if db.is_sqlite:
            for table in tables:
                connection.execute(text(f"DELETE FROM {table}"))
        else:
            connection.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))


@pytest.fixture
def worker(db: Database) -> Iterator[dramatiq.Worker]:
    """Real Dramatiq worker threads consuming the configured broker (in-process, Redis or RabbitMQ)."""
    running = dramatiq.Worker(JOBS.broker, worker_threads=4, worker_timeout=50)
    running.start()
    yield running
    running.stop()
    # Dramatiq leaves a stopped worker's middleware on the broker; drop it so the next worker is alone.
    JOBS.broker.middleware[:] = [m for m in JOBS.broker.middleware if type(m).__name__ != "_WorkerMiddleware"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LiveServer:
    """The app under uvicorn on a loopback port, in a background thread."""

    def __init__(self, app: Any):
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def server(db: Database) -> Iterator[LiveServer]:
    with LiveServer(create_app(jobs=JOBS, run_workers=False)) as live:
        yield live


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def dodo_server(db: Database) -> Iterator[LiveServer]:
    settings = get_settings().model_copy(update={"dodo_webhook_keys": (DODO_OLD_KEY, DODO_KEY)})
    with LiveServer(create_app(settings, jobs=JOBS, run_workers=False)) as live:
        yield live


@pytest.fixture
def dodo_http(dodo_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dodo_server.url, timeout=30) as client:
        yield client


@pytest.fixture
def service_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {SERVICE_TOKEN}"}


def wait_for(predicate: Callable[[], Any], *, timeout: float = 20, interval: float = 0.05, what: str = "") -> Any:
    """Poll until `predicate` returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)
