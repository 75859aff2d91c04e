"""The one way the ledger is written: postings become entries, and balances move with them.

Every `ledger_entries` row and every move of a balance's position (balance, overage, entry count,
last transaction) is made here: native grants, deductions, expiry and overage resets, the mirror of
a provider's ledger, and reconciliation adjustments. `post` takes a batch; a single posting is a
batch of one.

The arithmetic is a pure function, `plan`, from the balances' positions and the postings to the
entries and the new positions, so it can be checked on its own and against a one-at-a-time
reference. `amount` is always the change of the net position (balance - overage), so for every
balance `balance - overage == sum(amount)` (plus, for a mirror, the jumps of its recorded gaps).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, String, Table, Text, any_, bindparam, func, insert, select, text, tuple_, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from app.db import table_of, utcnow
from app.models import Balance, LedgerEntry

State = tuple[int, int]  # (balance, overage) in atoms


def net(state: State) -> int:
    return state[0] - state[1]


@dataclass(frozen=True)
class Source:
    """Why an entry exists; `dedupe_key` makes the cause count once."""

    dedupe_key: str | None = None
    inbox_event_id: int | None = None
    usage_event_id: str | None = None
    idempotency_key: str | None = None
    external_id: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class Posting:
    """One movement asked of a balance.

    `before` is None for a balance Tally keeps: the entry starts where the balance stands. A mirrored
    provider entry carries the provider's own before-values, and `moves_balance` is False when it
    arrived late: the entry is recorded and the balance's position is re-derived from the chain.
    """

    balance_id: int
    kind: str
    after: State
    at: datetime
    source: Source = Source()
    before: State | None = None
    moves_balance: bool = True
    grant_id: int | None = None


@dataclass(frozen=True)
class Position:
    """What posting changes on a balance."""

    state: State
    entry_count: int
    last_transaction_at: datetime | None


@dataclass(frozen=True)
class PlannedEntry:
    balance_id: int
    kind: str
    amount: int
    before: State
    after: State
    at: datetime
    source: Source
    grant_id: int | None


def plan(
    positions: Mapping[int, Position], postings: Sequence[Posting]
) -> tuple[list[PlannedEntry], dict[int, Position]]:
    """The entries of `postings`, in order, and every touched balance's position after them. Pure."""
    current = dict(positions)
    entries: list[PlannedEntry] = []
    for posting in postings:
        position = current[posting.balance_id]
        before = position.state if posting.before is None else posting.before
        entries.append(
            PlannedEntry(
                balance_id=posting.balance_id,
                kind=posting.kind,
                amount=net(posting.after) - net(before),
                before=before,
                after=posting.after,
                at=posting.at,
                source=posting.source,
                grant_id=posting.grant_id,
            )
        )
        if posting.moves_balance:
            position = Position(posting.after, position.entry_count, posting.at)
        current[posting.balance_id] = replace(position, entry_count=position.entry_count + 1)
    return entries, {balance_id: current[balance_id] for balance_id in {p.balance_id for p in postings}}


def position_of(balance: Balance) -> Position:
    return Position((balance.balance, balance.overage), balance.entry_count, balance.last_transaction_at)


def reposition(balance: Balance, position: Position) -> None:
    """Set a (locked) balance's position: after posting, or when a mirror re-derives it from its chain."""
    balance.balance, balance.overage = position.state
    balance.entry_count = position.entry_count
    balance.last_transaction_at = position.last_transaction_at


def post(session: Session, balances: Mapping[int, Balance], postings: Sequence[Posting]) -> list[LedgerEntry]:
    """Append the entries of `postings` and move their (locked) balances; the entries, in order."""
    if not postings:
        return []
    planned, positions = plan(
        {balance_id: position_of(balances[balance_id]) for balance_id in {p.balance_id for p in postings}}, postings
    )
    entries = [
        LedgerEntry(
            balance_id=item.balance_id,
            kind=item.kind,
            amount=item.amount,
            balance_before=item.before[0],
            balance_after=item.after[0],
            overage_before=item.before[1],
            overage_after=item.after[1],
            grant_id=item.grant_id,
            dedupe_key=item.source.dedupe_key,
            inbox_event_id=item.source.inbox_event_id,
            usage_event_id=item.source.usage_event_id,
            idempotency_key=item.source.idempotency_key,
            external_id=item.source.external_id,
            description=item.source.description,
            created_at=item.at,
        )
        for item in planned
    ]
    session.add_all(entries)
    for balance_id, position in positions.items():
        reposition(balances[balance_id], position)
    session.flush()
    return entries


def post_one(session: Session, balance: Balance, posting: Posting) -> LedgerEntry:
    """A batch of one."""
    return post(session, {balance.id: balance}, [posting])[0]


# --- set-based reads: rows by many keys, in a statement whose text does not depend on their number ----


def among(
    session: Session, columns: Sequence[ColumnElement[Any]], keys: Iterable[tuple[Any, ...]]
) -> ColumnElement[bool]:
    """`columns` equal one of `keys` (tuples of their values).

    On PostgreSQL the keys travel as one array per column (`= ANY(:a)`, `(a, b) IN (SELECT … FROM unnest(:a,
    :b))`): the statement's text stays the same however many keys there are, so psycopg prepares it once and
    no one renders and parses a placeholder per value (with 500 ids, a measurable share of a batch). SQLite
    gets a plain IN.
    """
    wanted = list(keys)
    if session.get_bind().dialect.name != "postgresql":
        if len(columns) == 1:
            return columns[0].in_([key[0] for key in wanted])
        return tuple_(*columns).in_(wanted)
    arrays = [
        bindparam(
            f"among_{index}",
            [key[index] for key in wanted],
            type_=ARRAY(Text() if isinstance(column.type, String) else column.type),
            unique=True,
        )
        for index, column in enumerate(columns)
    ]
    if len(columns) == 1:
        return columns[0] == any_(arrays[0])
    names = [f"k{index}" for index in range(len(columns))]
    rows = func.unnest(*arrays).table_valued(*names).render_derived()
    return tuple_(*columns).in_(select(*(rows.c[name] for name in names)))


# --- set-based posting: the writes of a whole batch in one round trip --------------------------------


def entry_row(item: PlannedEntry) -> dict[str, Any]:
    """The `ledger_entries` row of a planned entry (the same columns `post` fills through the ORM)."""
    return {
        "balance_id": item.balance_id,
        "kind": item.kind,
        "amount": item.amount,
        "balance_before": item.before[0],
        "balance_after": item.after[0],
        "overage_before": item.before[1],
        "overage_after": item.after[1],
        "grant_id": item.grant_id,
        "dedupe_key": item.source.dedupe_key,
        "inbox_event_id": item.source.inbox_event_id,
        "usage_event_id": item.source.usage_event_id,
        "idempotency_key": item.source.idempotency_key,
        "external_id": item.source.external_id,
        "description": item.source.description,
        "created_at": item.at,
    }


@dataclass(frozen=True)
class _Write:
    table: Table
    rows: list[dict[str, Any]]
    key: str | None  # an update by this column; None for an insert
    upsert_on: tuple[str, ...] = ()


@dataclass
class Writes:
    """Set-based writes gathered for one transaction and sent together by `send`.

    Each is one multi-row INSERT (optionally an upsert) or one UPDATE of many rows by key. On PostgreSQL
    all of them travel as ONE statement, each a data-modifying CTE (`WITH w0 AS (INSERT …), w1 AS (UPDATE
    …) SELECT 1`): one round trip however many tables and rows, while the balances are locked. Each part's
    rows travel as one JSON document (`json_to_recordset`, typed by the columns): encoded in C, where
    psycopg builds arrays element by element in Python; and the text depends only on which writes there
    are, so psycopg prepares it once. The parts touch different tables, so that they all see the same snapshot
    does not matter. On SQLite each is one prepared statement run for each row (in-process: no round trips).
    """

    parts: list[_Write] = field(default_factory=list)

    def insert(self, table: Table, rows: Sequence[dict[str, Any]], *, upsert_on: Sequence[str] = ()) -> None:
        """Rows all with the same keys; with `upsert_on`, a row whose key exists updates the other columns."""
        if rows:
            self.parts.append(_Write(table, list(rows), None, tuple(upsert_on)))

    def update(self, table: Table, rows: Sequence[dict[str, Any]], *, key: str = "id") -> None:
        """Rows all with the same keys, each updating the row whose `key` it names."""
        if rows:
            self.parts.append(_Write(table, list(rows), key))

    def send(self, session: Session) -> None:
        parts, self.parts = self.parts, []
        if not parts:
            return
        if session.get_bind().dialect.name == "postgresql":
            _send_postgres(session, parts)
            return
        for part in parts:
            _send_sqlite(session, part)


def _json_encoder() -> json.JSONEncoder:
    """JSON for a batch's rows; the batch's few distinct instants (its `now`) are rendered once each."""
    rendered: dict[datetime, str] = {}

    def instant(value: object) -> str:
        if isinstance(value, datetime):
            if value not in rendered:
                rendered[value] = value.isoformat()
            return rendered[value]
        raise TypeError(f"{type(value).__name__} cannot travel in a batch write")

    return json.JSONEncoder(default=instant, separators=(",", ":"))


def _send_postgres(session: Session, parts: Sequence[_Write]) -> None:
    dialect = session.get_bind().dialect
    quote = dialect.identifier_preparer.quote
    ctes: list[str] = []
    params: dict[str, str] = {}
    encoder = _json_encoder()
    for index, part in enumerate(parts):
        names = list(part.rows[0])
        # Strings travel as text: a cast to VARCHAR(n) would silently cut an over-long value, where the
        # assignment to the column refuses it.
        definitions = ", ".join(
            f"{quote(name)} "
            + (
                "TEXT"
                if isinstance(part.table.c[name].type, String)
                else part.table.c[name].type.compile(dialect=dialect)
            )
            for name in names
        )
        params[f"w{index}"] = encoder.encode(part.rows)
        source = f"json_to_recordset(CAST(:w{index} AS json)) AS v({definitions})"
        table = quote(part.table.name)
        if part.key is None:
            columns = ", ".join(quote(name) for name in names)
            sql = f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {source}"
            if part.upsert_on:
                updates = ", ".join(f"{quote(n)} = EXCLUDED.{quote(n)}" for n in names if n not in part.upsert_on)
                sql += f" ON CONFLICT ({', '.join(quote(n) for n in part.upsert_on)}) DO UPDATE SET {updates}"
        else:
            sets = ", ".join(f"{quote(name)} = v.{quote(name)}" for name in names if name != part.key)
            sql = f"UPDATE {table} AS t SET {sets} FROM {source} WHERE t.{quote(part.key)} = v.{quote(part.key)}"
        ctes.append(f"w{index} AS ({sql})")
    session.execute(text(f"WITH {', '.join(ctes)} SELECT 1"), params)


def _send_sqlite(session: Session, part: _Write) -> None:
    names = list(part.rows[0])
    table = part.table
    if part.key is not None:
        statement: Any = (
            update(table)
            .where(table.c[part.key] == bindparam("key_"))
            .values({name: bindparam(f"{name}_") for name in names if name != part.key})
        )
        rows = [{f"{name}_" if name != part.key else "key_": value for name, value in row.items()} for row in part.rows]
        session.execute(statement, rows)
    elif part.upsert_on:
        statement = sqlite.insert(table)
        statement = statement.on_conflict_do_update(
            index_elements=list(part.upsert_on),
            set_={name: statement.excluded[name] for name in names if name not in part.upsert_on},
        )
        session.execute(statement, part.rows)
    else:
        session.execute(insert(table), part.rows)


def append(
    writes: Writes,
    positions: Mapping[int, Position],
    postings: Sequence[Posting],
    *,
    balance_columns: Mapping[int, Mapping[str, Any]] | None = None,
) -> tuple[list[PlannedEntry], dict[int, Position]]:
    """The set-based `post`, for balances the caller has locked and loaded: `plan` in memory, then one INSERT of
    every entry and one UPDATE of every moved balance (with `balance_columns`, e.g. a period's usage) in `writes`.

    Nothing is read back: callers that need entry ids use `post`."""
    if not postings:
        return [], {}
    planned, moved = plan(positions, postings)
    writes.insert(table_of(LedgerEntry), [entry_row(item) for item in planned])
    now = utcnow()
    extra = balance_columns or {}
    writes.update(
        table_of(Balance),
        [
            {
                "id": balance_id,
                "balance": position.state[0],
                "overage": position.state[1],
                "entry_count": position.entry_count,
                "last_transaction_at": position.last_transaction_at,
                "updated_at": now,
                **extra.get(balance_id, {}),
            }
            for balance_id, position in sorted(moved.items())
        ],
    )
    return planned, moved
