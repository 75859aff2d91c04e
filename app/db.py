"""Database engines and sessions.

Tally runs on PostgreSQL in production and on a SQLite file as its embedded default. The two differ
in how writers serialise: PostgreSQL locks rows (`SELECT … FOR UPDATE`), SQLite locks the whole file.
On SQLite every write transaction therefore starts with `BEGIN IMMEDIATE`, so two writers queue on
the busy timeout instead of deadlocking when both try to upgrade a read lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, ClassVar, Protocol, cast

from sqlalchemy import DateTime, Engine, FromClause, Row, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from app.config import get_settings
from app.times import utcnow as utcnow


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class Page:
    """A window of a listing: `size` rows from page `number` (from 0)."""

    size: int
    number: int

    @property
    def offset(self) -> int:
        return self.size * self.number


class Mapped(Protocol):
    """A mapped class: what the helpers below need of it."""

    __table__: ClassVar[FromClause]


def table_of(model: type[Mapped]) -> Table:
    return cast(Table, model.__table__)


def insert_ignoring_conflicts_statement(session: Session, model: type[Mapped]) -> Any:
    """`INSERT … ON CONFLICT DO NOTHING` in the session's dialect (both databases have it)."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table_of(model)).on_conflict_do_nothing()


def insert_ignoring_conflicts(session: Session, model: type[Mapped], values: dict[str, Any]) -> Row[Any] | None:
    """Insert one row unless it conflicts: the new row's primary key, or None.

    This is how concurrent duplicates are absorbed: the unique constraint decides, not a prior read.
    RETURNING says for sure whether a row went in (rowcount can be -1 here on psycopg).
    """
    statement = insert_ignoring_conflicts_statement(session, model).values(**values)
    return session.execute(statement.returning(*table_of(model).primary_key.columns)).first()


class Database:
    """One engine, and sessions that know whether they write."""

    def __init__(self, url: str, *, pool_size: int = 20) -> None:
        """`pool_size` connections stay open; a burst past it opens (and closes) up to 10 more."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=pool_size, max_overflow=10
            )
            _configure_sqlite(self.engine)
        else:
            self.engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=10,
                # No pre-ping round trip per checkout: a connection found dead is discarded with its
                # pool on the first error (the request answers 503, the provider retries).
                connect_args={"connect_timeout": 3},
            )
        self._writer = sessionmaker(self.engine.execution_options(tally_write=True), expire_on_commit=False)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on any error."""
        with self._writer() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def async_url(url: str) -> str:
    """The same database through an asyncio driver: asyncpg for PostgreSQL, aiosqlite for SQLite."""
    scheme, rest = url.split("://", 1)
    return f"{'sqlite+aiosqlite' if scheme.startswith('sqlite') else 'postgresql+asyncpg'}://{rest}"


class AsyncDatabase:
    """The same database for the event loop: Core connections, no thread hop.

    asyncpg connections belong to the loop that opened them, so each app builds its own in its
    lifespan and disposes of it there.
    """

    def __init__(self, url: str, *, pool_size: int = 20) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine = create_async_engine(
                async_url(url), connect_args={"timeout": 30}, pool_size=pool_size, max_overflow=10
            )
            _configure_sqlite(self.engine.sync_engine)
        else:
            self.engine = create_async_engine(
                async_url(url), pool_size=pool_size, max_overflow=10, connect_args={"timeout": 3}
            )
        self._writing = self.engine.execution_options(tally_write=True)

    def write(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A transaction that commits on success and rolls back on any error."""
        return self._writing.begin()

    def read(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return self.engine.begin()

    async def dispose(self) -> None:
        await self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the begin hook below issue BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get("tally_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@lru_cache(maxsize=1)
def get_database() -> Database:
    """The process-wide database, built from the settings on first use."""
    settings = get_settings()
    return Database(settings.database_url, pool_size=settings.db_pool_size)
