"""Dodo Payments: mirrored balances and subscriptions compared with Dodo's, gaps filled, drift adjusted.

For every mirrored credit entitlement its balances are listed by hand, page numbers from 0 (the SDK's
auto-pagination skips page 1), stopping at a short page. A balance that differs from the mirror, or
whose chain has a recorded gap, gets its missing ledger entries: `list_ledger` from the entry before
the first gap (or from the newest entry Tally has), each mirrored through the code of the `credit.*`
webhooks. Whatever still differs is moved to Dodo's values by one `reconciliation_adjustment` entry
(Dodo is authoritative for its own ledger) and reported with both values. Each balance's repair is
one transaction.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from functools import partial
from typing import Any

import dodopayments
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.billing.subscriptions import ensure_customer
from app.db import utcnow
from app.errors import PayloadError
from app.ledger.amounts import from_atoms
from app.ledger.mirror import MIRROR_PRECISION, ProviderEntry, adjust_mirrored, ensure_provider_entitlement
from app.ledger.posting import State
from app.ledger.service import lock_balance
from app.models import Balance, CreditEntitlement, LedgerEntry, ProviderLedgerEntry, Subscription
from app.providers.dodo.handlers import apply_subscription, mirror_ledger_entry
from app.providers.dodo.objects import PROVIDER, parse_amount, parse_ledger_entry, parse_subscription
from app.reconciliation.context import PAGE_SIZE, RunContext, report_unknown_subscriptions
from app.reconciliation.limits import Failure, ProviderUnavailable, parse_retry_after
from app.reconciliation.runs import Drift

log = logging.getLogger(__name__)


def client_for(api_key: str, base_url: str | None) -> dodopayments.DodoPayments:
    """The official client; no SDK retries (the ApiCaller retries, honouring Retry-After)."""
    return dodopayments.DodoPayments(bearer_token=api_key, base_url=base_url, max_retries=0)


def classify(error: Exception) -> Failure | None:
    if isinstance(error, dodopayments.RateLimitError):
        return Failure(True, parse_retry_after(error.response.headers.get("retry-after")))
    if isinstance(error, dodopayments.APIConnectionError):
        return Failure(True)
    if isinstance(error, dodopayments.NotFoundError):
        return None
    if isinstance(error, dodopayments.APIStatusError):
        return Failure(error.status_code >= 500)
    return None


def reconcile(ctx: RunContext, client: dodopayments.DodoPayments) -> None:
    _balances(ctx, client)
    _subscriptions(ctx, client)


def _fmt(state: State | None) -> str | None:
    if state is None:
        return None
    return f"balance {_decimal(state[0])}, overage {_decimal(state[1])}"


def _decimal(atoms: int) -> str:
    """Atoms at the mirror precision as the shortest decimal (100, 0.5)."""
    return format(from_atoms(atoms, MIRROR_PRECISION).normalize(), "f")


# --- balances ------------------------------------------------------------------------------------


def _entitlements(ctx: RunContext) -> list[str]:
    with ctx.db.read() as session:
        return list(
            session.execute(
                select(CreditEntitlement.id)
                .where(CreditEntitlement.managed_by == PROVIDER)
                .order_by(CreditEntitlement.id)
            ).scalars()
        )


def _balances(ctx: RunContext, client: dodopayments.DodoPayments) -> None:
    for entitlement_id in _entitlements(ctx):
        number = 0
        while True:
            page = ctx.caller(
                partial(
                    client.credit_entitlements.balances.list, entitlement_id, page_number=number, page_size=PAGE_SIZE
                ),
                f"list balances of {entitlement_id}",
            )
            items = list(page.items)
            _balance_page(ctx, client, entitlement_id, items)
            ctx.checkpoint(f"balances of {entitlement_id}")
            if len(items) < PAGE_SIZE:
                break
            number += 1


def _balance_page(ctx: RunContext, client: dodopayments.DodoPayments, entitlement_id: str, items: list[Any]) -> None:
    customers = [item.customer_id for item in items]
    with ctx.db.read() as session:
        held = {
            balance.customer_id: balance
            for balance in session.execute(
                select(Balance).where(Balance.entitlement_id == entitlement_id, Balance.customer_id.in_(customers))
            ).scalars()
        }
        gapped = set(
            session.execute(
                select(ProviderLedgerEntry.balance_id)
                .where(
                    ProviderLedgerEntry.balance_id.in_([balance.id for balance in held.values()]),
                    ProviderLedgerEntry.follows_gap.is_(True),
                )
                .distinct()
            ).scalars()
        )
    for item in items:
        ctx.count("checked")
        try:
            live: State = (parse_amount(item.balance).atoms, parse_amount(item.overage).atoms)
        except ValueError:
            ctx.count("errors")
            log.error("reconciliation run %s: balance %s/%s unreadable", ctx.run_id, item.customer_id, entitlement_id)
            continue
        balance = held.get(item.customer_id)
        mirrored = None if balance is None else (balance.balance, balance.overage)
        has_gap = balance is not None and balance.id in gapped
        if (mirrored == live or (mirrored is None and live == (0, 0))) and not has_gap:
            ctx.count("matched")
            continue
        ctx.count("drifted")
        _repair_balance(ctx, client, entitlement_id, item, live, balance, has_gap)


def _ledger_start(session: Session, balance: Balance | None) -> datetime | None:
    """Where the missing entries can start: at the entry before the first gap, else at the newest entry."""
    if balance is None:
        return None
    first_gap = session.execute(
        select(ProviderLedgerEntry.chain_position)
        .where(ProviderLedgerEntry.balance_id == balance.id, ProviderLedgerEntry.follows_gap.is_(True))
        .order_by(ProviderLedgerEntry.chain_position)
        .limit(1)
    ).scalar_one_or_none()
    if first_gap is None:
        return balance.last_transaction_at
    if first_gap == 0:
        return None
    return session.execute(
        select(LedgerEntry.created_at)
        .join(ProviderLedgerEntry, ProviderLedgerEntry.ledger_entry_id == LedgerEntry.id)
        .where(ProviderLedgerEntry.balance_id == balance.id, ProviderLedgerEntry.chain_position == first_gap - 1)
    ).scalar_one_or_none()


def _fetch_ledger(
    ctx: RunContext, client: dodopayments.DodoPayments, entitlement_id: str, customer_id: str, start: datetime | None
) -> list[ProviderEntry]:
    """The balance's Dodo entries from `start` on, paged by hand from page 0."""
    found: list[ProviderEntry] = []
    number = 0
    extra: dict[str, Any] = {} if start is None else {"start_date": start}
    while True:
        page = ctx.caller(
            partial(
                client.credit_entitlements.balances.list_ledger,
                customer_id,
                credit_entitlement_id=entitlement_id,
                page_number=number,
                page_size=PAGE_SIZE,
                **extra,
            ),
            f"list the ledger of {customer_id}/{entitlement_id}",
        )
        items = list(page.items)
        for item in items:
            # Read through the webhook's own parser: a ledger entry is a `credit.*` event's data.
            found.append(parse_ledger_entry({"type": "credit.reconciled", "data": item.to_dict(mode="json")}))
        if len(items) < PAGE_SIZE:
            return sorted(found, key=lambda entry: (entry.created_at, entry.external_id))
        number += 1


def _repair_balance(
    ctx: RunContext,
    client: dodopayments.DodoPayments,
    entitlement_id: str,
    item: Any,
    live: State,
    balance: Balance | None,
    has_gap: bool,
) -> None:
    customer_id = item.customer_id
    object_id = f"{customer_id}/{entitlement_id}"
    mirrored = None if balance is None else (balance.balance, balance.overage)
    with ctx.db.read() as session:
        start = _ledger_start(session, balance)
    try:
        entries = _fetch_ledger(ctx, client, entitlement_id, customer_id, start)
    except PayloadError as error:
        ctx.count("errors")
        ctx.drift(Drift("balance", object_id, "ledger", _fmt(mirrored), _fmt(live), f"error: {error}"[:64]))
        return
    with ctx.db.read() as session:
        known = set(
            session.execute(
                select(LedgerEntry.dedupe_key).where(LedgerEntry.dedupe_key.in_([e.dedupe_key for e in entries]))
            ).scalars()
        )
    missing = [entry for entry in entries if entry.dedupe_key not in known]
    if ctx.dry_run:
        if missing:
            ctx.drift(Drift("balance", object_id, "ledger_entries", "missing", _ids(missing), "would mirror"))
        newest = max(entries, key=lambda e: e.created_at) if entries else None
        predicted = (newest.balance_after, newest.overage_after) if newest is not None and missing else mirrored
        if predicted != live:
            ctx.drift(Drift("balance", object_id, "balance", _fmt(mirrored), _fmt(live), "would adjust"))
        return
    try:
        with ctx.db.write() as session:
            for entry in missing:
                mirror_ledger_entry(session, entry)
            if balance is None and not missing:
                # Dodo holds a balance no entry explains, and Tally has never seen it.
                ensure_customer(session, customer_id, PROVIDER)
                ensure_provider_entitlement(session, entitlement_id, PROVIDER)
            locked = lock_balance(session, customer_id, entitlement_id)
            after_mirror: State = (locked.balance, locked.overage)
            gap_left = (
                session.execute(
                    select(ProviderLedgerEntry.ledger_entry_id)
                    .where(ProviderLedgerEntry.balance_id == locked.id, ProviderLedgerEntry.follows_gap.is_(True))
                    .limit(1)
                ).first()
                is not None
            )
            adjusted = after_mirror != live
            if adjusted:
                at = item.updated_at if isinstance(item.updated_at, datetime) else utcnow()
                adjust_mirrored(
                    session,
                    locked,
                    live,
                    min(at, utcnow()),
                    dedupe_key=f"reconcile:{ctx.run_id}:{locked.id}",
                    description=f"reconciliation run {ctx.run_id}: Dodo reports {_fmt(live)}",
                )
    except ProviderUnavailable:
        raise
    except Exception as error:
        ctx.count("errors")
        log.exception("reconciliation run %s: repairing balance %s failed", ctx.run_id, object_id)
        ctx.drift(Drift("balance", object_id, "balance", _fmt(mirrored), _fmt(live), f"error: {error}"[:64]))
        return
    ctx.count("repaired")
    if missing:
        ctx.drift(Drift("balance", object_id, "ledger_entries", "missing", _ids(missing), f"mirrored {len(missing)}"))
    if has_gap:
        ctx.drift(Drift("balance", object_id, "gap", "recorded", "filled" if not gap_left else "still open",
                        "gap closed" if not gap_left else "gap left"))  # fmt: skip
    if mirrored != live:
        ctx.drift(
            Drift(
                "balance",
                object_id,
                "balance",
                _fmt(mirrored),
                _fmt(live),
                "adjusted" if adjusted else "explained by missing entries",
            )
        )
    elif adjusted:
        ctx.drift(Drift("balance", object_id, "balance", _fmt(after_mirror), _fmt(live), "adjusted"))


def _ids(entries: list[ProviderEntry]) -> str:
    shown = ", ".join(entry.external_id for entry in entries[:5])
    return f"{len(entries)}: {shown}{', …' if len(entries) > 5 else ''}"


# --- subscriptions -------------------------------------------------------------------------------


def _fmt_time(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def _fields(status: str, start: datetime | None, end: datetime | None, cancel: bool,
            cancelled_at: datetime | None) -> dict[str, str | None]:  # fmt: skip
    return {
        "status": status,
        "current_period_start": _fmt_time(start),
        "current_period_end": _fmt_time(end),
        "cancel_at_period_end": "true" if cancel else "false",
        "canceled_at": _fmt_time(cancelled_at),
    }


def _live_fields(item: Any) -> dict[str, str | None]:
    return _fields(
        item.status,
        item.previous_billing_date,
        item.next_billing_date,
        bool(item.cancel_at_next_billing_date),
        item.cancelled_at,
    )


def _row_fields(row: Subscription) -> dict[str, str | None]:
    return _fields(
        row.status, row.current_period_start, row.current_period_end, row.cancel_at_period_end, row.canceled_at
    )


def _subscriptions(ctx: RunContext, client: dodopayments.DodoPayments) -> None:
    number = 0
    while True:
        page = ctx.caller(
            partial(client.subscriptions.list, page_number=number, page_size=PAGE_SIZE), "list subscriptions"
        )
        items = list(page.items)
        ids = [item.subscription_id for item in items]
        with ctx.db.write() as session:
            ctx.recorder.saw(session, ids)
            rows = {
                row.id: row for row in session.execute(select(Subscription).where(Subscription.id.in_(ids))).scalars()
            }
        for item in items:
            _subscription(ctx, client, item, rows.get(item.subscription_id))
        ctx.checkpoint("subscriptions")
        if len(items) < PAGE_SIZE:
            break
        number += 1
    report_unknown_subscriptions(ctx, PROVIDER, "Dodo")


def _subscription(ctx: RunContext, client: dodopayments.DodoPayments, item: Any, row: Subscription | None) -> None:
    ctx.count("checked")
    subscription_id = item.subscription_id
    live = _live_fields(item)
    drifts: list[tuple[str, str | None, str | None]]
    if row is None:
        drifts = [("exists", "missing", live["status"])]
    else:
        held = _row_fields(row)
        drifts = [(name, held[name], live[name]) for name in live if held[name] != live[name]]
    if not drifts:
        ctx.count("matched")
        return
    ctx.count("drifted")
    if ctx.dry_run:
        for name, held_value, live_value in drifts:
            ctx.drift(Drift("subscription", subscription_id, name, held_value, live_value, "would repair"))
        return
    fetched_at = int(time.time())
    full = ctx.caller(lambda: client.subscriptions.retrieve(subscription_id), f"retrieve {subscription_id}")
    try:
        parsed = parse_subscription(
            {"type": "subscription.updated", "data": {"payload_type": "Subscription", **full.to_dict(mode="json")}}
        )
        with ctx.db.write() as session:
            # One second past the fetch: the fetched state outranks webhooks received in the same second
            # (their state is no newer), and a webhook received later still wins.
            applied = apply_subscription(session, parsed, event_id=ctx.watermark_id, received_seconds=fetched_at + 1)
    except ProviderUnavailable:
        raise
    except Exception as error:
        ctx.count("errors")
        log.exception("reconciliation run %s: repairing subscription %s failed", ctx.run_id, subscription_id)
        for name, held_value, live_value in drifts:
            ctx.drift(Drift("subscription", subscription_id, name, held_value, live_value, f"error: {error}"[:64]))
        return
    action = ("created" if row is None else "repaired") if applied else "kept: newer webhook"
    for name, held_value, live_value in drifts:
        ctx.drift(Drift("subscription", subscription_id, name, held_value, live_value, action))
    if applied:
        ctx.count("repaired")
