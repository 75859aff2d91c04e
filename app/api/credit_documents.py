"""Read models of the Dodo-shaped credit endpoints (seeds 000, 003, the balance ledger) and `/credits` (seed 004).

Shapes follow the seeds exactly: balances, overage and limits are decimal strings; `/credits` totals
are JSON numbers. Mirrored Dodo amounts are stored at precision 10 and rendered with the decimal
places Dodo itself used (at least), so "250.00" comes back as "250.00"; Tally-native entitlements
render at their own precision.

Every read runs on the event loop (`AsyncDatabase`), never in a thread, with Core statements of
columns: no ORM objects are built to be thrown away. The balance (seed 003) is one statement that
carries everything its answer needs, run by `OneRowRead` on the pooled connection's driver.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sqlite3
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import ColumnElement, Select, and_, bindparam, event, func, or_, select
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from app.db import AsyncDatabase, Page, table_of
from app.errors import NotFound, Unavailable
from app.group_commit import is_outage
from app.ledger.amounts import from_atoms, json_number
from app.ledger.limits import limit_reached, remaining_headroom
from app.models import (
    Balance,
    CreditEntitlement,
    Customer,
    LedgerEntry,
    ProviderEntitlement,
    ProviderLedgerEntry,
    Subscription,
    SubscriptionCredit,
)
from app.times import render_optional

# Tally's entry kinds as Dodo transaction types, for entries Tally wrote itself.
TRANSACTION_TYPES = {
    "grant": "credit_added",
    "deduction": "credit_deducted",
    "expiry": "credit_expired",
    "rollover": "credit_rolled_over",
    "overage_charge": "overage_charged",
    "overage_reset": "overage_reset",
    "manual_adjustment": "manual_adjustment",
    "reconciliation_adjustment": "manual_adjustment",
    "refund": "refund",
}
USAGE_KINDS = ("deduction", "overage_charge")
"""Entries that count as usage in `/credits`."""

T = TypeVar("T")
RowLike = Mapping[Any, Any]
"""A row read by name: a `OneRowRead` dict or a Core `RowMapping`."""

customers = table_of(Customer)
subscriptions = table_of(Subscription)
balances = table_of(Balance)
entitlements = table_of(CreditEntitlement)
provider_entitlements = table_of(ProviderEntitlement)
ledger_entries = table_of(LedgerEntry)
provider_entries = table_of(ProviderLedgerEntry)
subscription_credits = table_of(SubscriptionCredit)


# --- reading on the event loop -------------------------------------------------------------------


def database_unavailable() -> Unavailable:
    return Unavailable("the database is unavailable; retry later", code="database_unavailable")


DRIVER_OUTAGES: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,  # the connection is closed or broken
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # shutting down, starting up
    asyncpg.TooManyConnectionsError,
    sqlite3.OperationalError,  # locked past the busy timeout, or the file cannot be opened
)
"""Errors of the drivers themselves (not wrapped by SQLAlchemy) that mean "the database is unreachable"."""


RESERVED_CONNECTIONS = 4
"""Connections of the async pool never lent to one-row reads (see `ReadConnections`)."""


class ReadConnections:
    """A few connections of the async engine's pool, kept checked out for `OneRowRead` and lent without SQLAlchemy.

    Why: SQLAlchemy's async pool checks a connection out, and back in, each in a new greenlet, and
    every new greenlet maps (and unmaps) a Python frame stack of its own; with the pool's bookkeeping
    that cost as much CPU as the read itself under load (bench/reads.py; strace shows an mmap and a
    munmap per checkout). Here a read borrows an idle connection, or checks a new one out of the pool
    while fewer than `size` exist, or waits for one to come back (handed over directly, first come
    first served): no greenlet, no pool events, no connection opened and closed per request.

    - At most `size`: the pool less `RESERVED_CONNECTIONS`, which stay for the other users of the
      async engine (the group-commit writers, token lookups, Core reads). Reads past `size` wait for
      one: bench/reads.py and bench/run.py P3 measured 10, 16 and 20 of a pool of 20; the read rate
      at -c32 grew with the number (a read waits on PostgreSQL more than it works), and a pool fully
      lent would leave the others only overflow connections, opened and closed per use.
    - A connection whose statement failed is invalidated (closed); its place is free for a new one.
    - Disposing of the engine (the app's shutdown) closes them: the lent ones when they come back.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        pool_size = getattr(engine.sync_engine.pool, "size", None)
        self.engine = engine  # not the AsyncDatabase: the registry below must not keep its key alive
        self.size = max(1, (pool_size() if callable(pool_size) else 20) - RESERVED_CONNECTIONS)
        self.count = 0  # connections checked out of the pool: idle, lent, or being opened
        self._idle: list[PoolProxiedConnection] = []
        self._waiters: collections.deque[asyncio.Future[PoolProxiedConnection | None]] = collections.deque()
        self._generation = 0  # bumped by every dispose of the engine: older connections are closed, not kept
        event.listen(engine.sync_engine, "engine_disposed", self._on_dispose)

    def _on_dispose(self, _engine: Any) -> None:
        """Runs inside `AsyncEngine.dispose`'s greenlet, so closing may wait on the driver."""
        self._generation += 1
        idle, self._idle = self._idle, []
        self.count -= len(idle)
        for connection in idle:
            _discard(connection, None)

    async def run(self, send: Callable[[Any], Awaitable[T]]) -> T:
        """`send(driver connection)` (asyncpg's or aiosqlite's) on a lent connection; a database outage is a 503."""
        connection = self._idle.pop() if self._idle else await self._take()
        generation = self._generation
        try:
            result = await send(connection.driver_connection)
        except BaseException as error:  # failed (or cancelled) mid-statement: never lent again
            await self._drop(connection, error if isinstance(error, Exception) else None)
            if isinstance(error, DRIVER_OUTAGES):
                raise database_unavailable() from error
            raise
        if generation != self._generation:
            await self._drop(connection, None)
        else:
            self._give_back(connection)
        return result

    async def _take(self) -> PoolProxiedConnection:
        while True:
            if self._idle:
                return self._idle.pop()
            if self.count < self.size:
                return await self._open()
            waiter: asyncio.Future[PoolProxiedConnection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over just as this request was cancelled
                    handed = waiter.result()
                    if handed is None:
                        self._wake_one(None)  # pass the free place on
                    else:
                        self._give_back(handed)
                raise
            if handed is not None:
                return handed
            # None: a connection was dropped, its place is free; loop to open one (or take an idle one)

    async def _open(self) -> PoolProxiedConnection:
        self.count += 1
        try:
            return await self.engine.raw_connection()
        except BaseException as error:
            self.count -= 1
            self._wake_one(None)
            if isinstance(error, Exception) and (is_outage(error) or isinstance(error, DRIVER_OUTAGES)):
                raise database_unavailable() from error
            raise

    def _give_back(self, connection: PoolProxiedConnection) -> None:
        if not self._wake_one(connection):
            self._idle.append(connection)

    def _wake_one(self, connection: PoolProxiedConnection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    async def _drop(self, connection: PoolProxiedConnection, error: Exception | None) -> None:
        self.count -= 1
        self._wake_one(None)
        await greenlet_spawn(_discard, connection, error)


def _discard(connection: PoolProxiedConnection, error: Exception | None) -> None:
    connection.invalidate(error)
    connection.close()


_read_connections: weakref.WeakKeyDictionary[AsyncDatabase, ReadConnections] = weakref.WeakKeyDictionary()


def read_connections(adb: AsyncDatabase) -> ReadConnections:
    found = _read_connections.get(adb)
    if found is None:
        found = _read_connections[adb] = ReadConnections(adb.engine)
    return found


@contextlib.asynccontextmanager
async def reading(adb: AsyncDatabase) -> AsyncIterator[AsyncConnection]:
    """A read transaction on the async engine; the database down answers 503, as the threaded reads did.

    SQLAlchemy wraps errors of a statement, but not every failure to connect (asyncpg raises a bare
    `OSError`), so outages are named here once for every read.
    """
    try:
        async with adb.read() as connection:
            yield connection
    except Exception as error:
        if is_outage(error) or isinstance(error, DRIVER_OUTAGES):
            raise database_unavailable() from error
        raise


@dataclass(frozen=True)
class _Compiled:
    sql: str
    arguments: tuple[tuple[str, Any, bool], ...]  # (name, compiled value, required: given by the caller)
    keys: tuple[str, ...]
    processors: tuple[Any, ...]  # SQLAlchemy's result processor of each column, or None


class OneRowRead:
    """One SELECT of labelled columns, compiled once per dialect and run on the pooled connection's driver.

    Why not `connection.execute`: for a one-row read, SQLAlchemy's async execution path (its DBAPI
    adapter, a BEGIN and a ROLLBACK round trip on asyncpg, result objects, the statement's cache key)
    cost about three times the query itself (bench/reads.py). Here the statement is compiled by
    SQLAlchemy for the engine's dialect once; each call borrows a connection of the same pool
    (`ReadConnections`), sends the SQL with its arguments in one round trip (a single statement needs
    no transaction to be consistent) and converts the values with SQLAlchemy's own result processors,
    so both dialects answer exactly what a Core execution would. One code path for asyncpg and
    aiosqlite: only the call that sends the SQL differs.

    Parameters are passed to the driver as given: use it for strings and integers, which need no bind
    processing.
    """

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, str], _Compiled] = {}

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = self.statement.compile(dialect=dialect)
        assert compiled.positiontup is not None, "a positional paramstyle (asyncpg, sqlite)"
        defaults = compiled.params  # the values SQLAlchemy bound itself (LIMIT 1, CASE results …)
        columns = list(self.statement.selected_columns)
        return _Compiled(
            sql=compiled.string,
            arguments=tuple((name, defaults[name], compiled.binds[name].required) for name in compiled.positiontup),
            keys=tuple(str(column.key) for column in columns),
            processors=tuple(column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns),
        )

    async def fetch(self, adb: AsyncDatabase, **parameters: Any) -> dict[str, Any] | None:
        """The row as a dict of the labels, or None; a database outage raises `Unavailable` (503)."""
        dialect = adb.engine.dialect
        compiled = self._compiled.get((dialect.name, dialect.driver))
        if compiled is None:
            compiled = self._compiled[(dialect.name, dialect.driver)] = self._compile(dialect)
        arguments = [parameters[name] if given else value for name, value, given in compiled.arguments]
        if adb.is_sqlite:
            rows = await read_connections(adb).run(lambda driver: driver.execute_fetchall(compiled.sql, arguments))
            row = rows[0] if rows else None
        else:
            row = await read_connections(adb).run(lambda driver: driver.fetchrow(compiled.sql, *arguments))
        if row is None:
            return None
        return {
            key: value if process is None else process(value)
            for key, process, value in zip(compiled.keys, compiled.processors, row, strict=True)
        }


# --- amounts as Dodo renders them --------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """How to render one entitlement's atoms."""

    precision: int  # of the stored atoms
    display_precision: int  # fewest places to show

    def render(self, atoms: int) -> str:
        value = from_atoms(atoms, self.precision)
        exponent = value.normalize().as_tuple().exponent
        needed = -exponent if isinstance(exponent, int) and exponent < 0 else 0
        return f"{value:.{min(max(self.display_precision, needed), self.precision)}f}"


def format_columns() -> list[ColumnElement[Any]]:
    """What `format_of` reads: to be selected with the entitlement outer-joined to its provider row."""
    return [
        entitlements.c.precision.label("precision"),
        entitlements.c.managed_by.label("managed_by"),
        provider_entitlements.c.display_precision.label("display_precision"),
    ]


def format_of(row: RowLike) -> Format:
    """Tally's own entitlements at their precision; a provider's with the places the provider used."""
    if row["managed_by"] == "tally":
        return Format(row["precision"], row["precision"])
    return Format(row["precision"], row["display_precision"] or 0)


def _with_format(statement: Select[Any]) -> Select[Any]:
    return statement.outerjoin(provider_entitlements, provider_entitlements.c.entitlement_id == entitlements.c.id)


# --- GET /subscriptions/{id}/credit-usage (seed 000) ---------------------------------------------


def usage_status(row: RowLike, *, overage_enabled: bool, overage_limit: int | None) -> dict[str, Any]:
    """One CreditEntitlementUsageStatus; the limit rules are the ledger's (`app.ledger.limits`)."""
    fmt = format_of(row)
    amount, overage = row["balance"] or 0, row["overage"] or 0  # no balance yet: zero
    headroom = remaining_headroom(overage, overage_enabled=overage_enabled, overage_limit=overage_limit)
    return {
        "credit_entitlement_id": row["entitlement_id"],
        "credit_entitlement_name": row["entitlement_name"],
        "unit": row["unit"],
        "balance": fmt.render(amount),
        "overage": fmt.render(overage),
        "overage_enabled": overage_enabled,
        "overage_limit": None if overage_limit is None else fmt.render(overage_limit),
        "remaining_headroom": None if headroom is None else fmt.render(headroom),
        "limit_reached": limit_reached(amount, overage, overage_enabled=overage_enabled, overage_limit=overage_limit),
    }


_ENTITLEMENT_COLUMNS = [
    entitlements.c.id.label("entitlement_id"),
    entitlements.c.name.label("entitlement_name"),
    entitlements.c.unit.label("unit"),
    *format_columns(),
]
_SUBSCRIPTION_CUSTOMER = select(subscriptions.c.customer_id).where(subscriptions.c.id == bindparam("subscription_id"))
_CART_LINES = (
    _with_format(
        select(
            subscription_credits.c.overage_enabled.label("line_overage_enabled"),
            subscription_credits.c.overage_limit.label("line_overage_limit"),
            balances.c.balance.label("balance"),
            balances.c.overage.label("overage"),
            *_ENTITLEMENT_COLUMNS,
        )
        .select_from(subscription_credits)
        .join(entitlements, entitlements.c.id == subscription_credits.c.entitlement_id)
        .outerjoin(
            balances,
            and_(balances.c.customer_id == bindparam("customer_id"), balances.c.entitlement_id == entitlements.c.id),
        )
    )
    .where(subscription_credits.c.subscription_id == bindparam("subscription_id"))
    .order_by(subscription_credits.c.id)
)
_NATIVE_BALANCES = (
    _with_format(
        select(
            balances.c.overage_enabled.label("balance_overage_enabled"),
            balances.c.overage_limit.label("balance_overage_limit"),
            balances.c.balance.label("balance"),
            balances.c.overage.label("overage"),
            *_ENTITLEMENT_COLUMNS,
        )
        .select_from(balances)
        .join(entitlements, entitlements.c.id == balances.c.entitlement_id)
    )
    .where(
        balances.c.customer_id == bindparam("customer_id"), balances.c.subscription_id == bindparam("subscription_id")
    )
    .order_by(balances.c.id)
)


async def subscription_customer(adb: AsyncDatabase, subscription_id: str) -> str:
    """The customer of a subscription, for the token check before anything is read; 404 if unknown."""
    async with reading(adb) as connection:
        customer_id = (
            await connection.execute(_SUBSCRIPTION_CUSTOMER, {"subscription_id": subscription_id})
        ).scalar_one_or_none()
    if customer_id is None:
        raise NotFound(f"no subscription {subscription_id!r}")
    return str(customer_id)


async def credit_usage_document(adb: AsyncDatabase, subscription_id: str, customer_id: str) -> dict[str, Any]:
    """Every entitlement of the subscription: Dodo's cart lines, then Tally-native balances tied to it."""
    parameters = {"subscription_id": subscription_id, "customer_id": customer_id}
    async with reading(adb) as connection:
        lines = (await connection.execute(_CART_LINES, parameters)).mappings().all()
        native = (await connection.execute(_NATIVE_BALANCES, parameters)).mappings().all()
    items = [
        usage_status(line, overage_enabled=line["line_overage_enabled"], overage_limit=line["line_overage_limit"])
        for line in lines
    ]
    seen = {line["entitlement_id"] for line in lines}
    items += [
        usage_status(row, overage_enabled=row["balance_overage_enabled"], overage_limit=row["balance_overage_limit"])
        for row in native
        if row["entitlement_id"] not in seen
    ]
    return {"subscription_id": subscription_id, "items": items}


# --- GET /credit-entitlements/{ce}/balances/{customer_id} (seed 003) -----------------------------


BALANCE = OneRowRead(
    _with_format(
        select(
            balances.c.id.label("id"),
            balances.c.customer_id.label("customer_id"),
            balances.c.entitlement_id.label("entitlement_id"),
            balances.c.balance.label("balance"),
            balances.c.overage.label("overage"),
            balances.c.created_at.label("created_at"),
            balances.c.updated_at.label("updated_at"),
            balances.c.last_transaction_at.label("last_transaction_at"),
            *format_columns(),
        )
        .select_from(balances)
        .join(entitlements, entitlements.c.id == balances.c.entitlement_id)
    ).where(
        balances.c.customer_id == bindparam("customer_id"), balances.c.entitlement_id == bindparam("entitlement_id")
    )
)
"""A customer's balance in one entitlement, with how to render it: all seed 003 needs, in one statement."""


async def find_balance(adb: AsyncDatabase, customer_id: str, entitlement_id: str) -> dict[str, Any]:
    """The balance row with its format columns; 404 when the customer has none in the entitlement."""
    row = await BALANCE.fetch(adb, customer_id=customer_id, entitlement_id=entitlement_id)
    if row is None:
        raise NotFound(f"no balance for customer {customer_id!r} in credit entitlement {entitlement_id!r}")
    return row


def balance_document(row: RowLike) -> dict[str, Any]:
    fmt = format_of(row)
    return {
        "id": str(row["id"]),
        "customer_id": row["customer_id"],
        "credit_entitlement_id": row["entitlement_id"],
        "balance": fmt.render(row["balance"]),
        "overage": fmt.render(row["overage"]),
        "created_at": render_optional(row["created_at"]),
        "updated_at": render_optional(row["updated_at"]),
        "last_transaction_at": render_optional(row["last_transaction_at"]),
    }


# --- GET …/balances/{customer_id}/ledger ---------------------------------------------------------


@dataclass(frozen=True)
class LedgerFilter:
    transaction_type: str | None = None
    start: datetime | None = None
    end: datetime | None = None


_ENTRIES = (
    select(
        ledger_entries.c.id,
        ledger_entries.c.kind,
        ledger_entries.c.amount,
        ledger_entries.c.balance_before,
        ledger_entries.c.balance_after,
        ledger_entries.c.overage_before,
        ledger_entries.c.overage_after,
        ledger_entries.c.grant_id,
        ledger_entries.c.usage_event_id,
        ledger_entries.c.idempotency_key,
        ledger_entries.c.external_id,
        ledger_entries.c.description,
        ledger_entries.c.created_at,
        provider_entries.c.ledger_entry_id.label("provider_entry_id"),
        provider_entries.c.transaction_type.label("provider_transaction_type"),
        provider_entries.c.is_credit.label("provider_is_credit"),
        provider_entries.c.amount.label("provider_amount"),
        provider_entries.c.provider_grant_id,
        provider_entries.c.reference_type,
        provider_entries.c.reference_id,
        provider_entries.c.extra,
    )
    .select_from(ledger_entries)
    .outerjoin(provider_entries, provider_entries.c.ledger_entry_id == ledger_entries.c.id)
)


def _entry_document(entry: RowLike, balance: RowLike, fmt: Format) -> dict[str, Any]:
    mirrored = entry["provider_entry_id"] is not None
    extra = (entry["extra"] or {}) if mirrored else {}
    if mirrored:
        transaction_type = entry["provider_transaction_type"]
        is_credit, amount = entry["provider_is_credit"], entry["provider_amount"]
    else:
        transaction_type = TRANSACTION_TYPES.get(entry["kind"], entry["kind"])
        is_credit, amount = entry["amount"] > 0, abs(entry["amount"])
    if mirrored:
        grant_id, reference_id = entry["provider_grant_id"], entry["reference_id"]
    else:
        grant_id = str(entry["grant_id"]) if entry["grant_id"] else None
        reference_id = entry["usage_event_id"] or entry["idempotency_key"]
    return {
        "id": entry["external_id"] or str(entry["id"]),
        "credit_entitlement_id": balance["entitlement_id"],
        "customer_id": balance["customer_id"],
        "transaction_type": transaction_type,
        "is_credit": is_credit,
        "amount": fmt.render(amount),
        "balance_before": fmt.render(entry["balance_before"]),
        "balance_after": fmt.render(entry["balance_after"]),
        "overage_before": fmt.render(entry["overage_before"]),
        "overage_after": fmt.render(entry["overage_after"]),
        "grant_id": grant_id,
        "description": entry["description"],
        "reference_type": entry["reference_type"] if mirrored else None,
        "reference_id": reference_id,
        "metadata": extra.get("metadata") or {},
        "brand_id": extra.get("brand_id", ""),
        "business_id": extra.get("business_id", ""),
        "created_at": render_optional(entry["created_at"]),
    }


async def ledger_document(
    adb: AsyncDatabase, customer_id: str, entitlement_id: str, page: Page, filters: LedgerFilter
) -> dict[str, Any]:
    """The balance's entries, newest first in the provider's order (time, then chain position); 404 without one."""
    balance = await find_balance(adb, customer_id, entitlement_id)
    query = _ENTRIES.where(ledger_entries.c.balance_id == balance["id"])
    if filters.transaction_type:
        kinds = [kind for kind, name in TRANSACTION_TYPES.items() if name == filters.transaction_type]
        query = query.where(
            or_(
                provider_entries.c.transaction_type == filters.transaction_type,
                and_(provider_entries.c.ledger_entry_id.is_(None), ledger_entries.c.kind.in_(kinds)),
            )
        )
    if filters.start:
        query = query.where(ledger_entries.c.created_at >= filters.start)
    if filters.end:
        query = query.where(ledger_entries.c.created_at <= filters.end)
    query = (
        query.order_by(
            ledger_entries.c.created_at.desc(),
            func.coalesce(provider_entries.c.chain_position, -1).desc(),
            ledger_entries.c.id.desc(),
        )
        .limit(page.size)
        .offset(page.offset)
    )
    async with reading(adb) as connection:
        rows = (await connection.execute(query)).mappings().all()
    fmt = format_of(balance)
    return {"items": [_entry_document(entry, balance, fmt) for entry in rows]}


# --- GET /credits (seed 004) ---------------------------------------------------------------------


_USED_ATOMS = (
    select(func.coalesce(func.sum(ledger_entries.c.amount), 0))
    .where(ledger_entries.c.balance_id == balances.c.id, ledger_entries.c.kind.in_(USAGE_KINDS))
    .scalar_subquery()
)
_CREDITS = (
    select(
        customers.c.id.label("customer_id"),
        balances.c.id.label("balance_id"),
        balances.c.balance,
        balances.c.overage,
        entitlements.c.precision,
        _USED_ATOMS.label("used_atoms"),
    )
    .select_from(customers)
    .outerjoin(balances, balances.c.customer_id == customers.c.id)
    .outerjoin(entitlements, entitlements.c.id == balances.c.entitlement_id)
    .where(customers.c.id == bindparam("customer_id"))
)
"""The customer (so an unknown one is told apart from one without balances) with every balance and its usage."""


async def credits_document(adb: AsyncDatabase, customer_id: str) -> dict[str, Any]:
    """Totals over all the customer's balances, as numbers; 404 for an unknown customer.

    `total_usage` is what deductions and overage charges consumed; `total_credits` is everything the
    customer was given net of expiries (grants, top-ups, rollovers, adjustments, refunds, reset
    overage), so that `total_credits - total_usage` is the current net position, balance - overage.
    """
    async with reading(adb) as connection:
        rows = (await connection.execute(_CREDITS, {"customer_id": customer_id})).mappings().all()
    if not rows:
        raise NotFound(f"no customer {customer_id!r}", code="customer_not_found")
    total_credits = total_usage = Decimal(0)
    for row in rows:
        if row["balance_id"] is None:
            continue  # a customer without balances: the outer join's one empty row
        precision = row["precision"]
        usage = from_atoms(-int(row["used_atoms"]), precision)
        total_usage += usage
        total_credits += from_atoms(row["balance"] - row["overage"], precision) + usage
    return {"data": {"total_credits": json_number(total_credits), "total_usage": json_number(total_usage)}}
