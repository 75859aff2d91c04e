"""Stripe: failed-delivery events, thin events and subscriptions, compared with Tally and repaired.

Order of a run: events Stripe could not deliver go through the normal inbox path first (deduplication
makes a re-delivery harmless); then thin events Tally stored and skipped are resolved by fetching
their object; then every subscription is listed (100 a page) and compared. A repair goes through the
webhook's own code (`apply_subscription`) with a watermark "as of the fetch": the fetch time in
seconds, a rank above every event type, and `reconcile:<run id>`, so an older webhook arriving later
cannot undo it and a newer one still wins. A missed renewal is granted with the renewal's own grant
key, so the late webhook is a no-op.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import stripe
from sqlalchemy import select

from app.billing.snapshots import Watermark
from app.billing.subscriptions import SubscriptionSnapshot
from app.db import utcnow
from app.errors import PayloadError
from app.inbox import processing
from app.inbox.store import store_event
from app.ledger.posting import Source
from app.ledger.service import find_entry
from app.models import Grant, InboxEvent, Subscription
from app.providers.base import HandlerContext
from app.providers.stripe.handlers import GRANTING_STATUSES, apply_subscription, resolve_plan
from app.providers.stripe.objects import THIN_EVENT, SubscriptionEvent, parse_subscription_event
from app.reconciliation.context import PAGE_SIZE, RunContext, report_unknown_subscriptions
from app.reconciliation.limits import Failure, ProviderUnavailable, parse_retry_after
from app.reconciliation.runs import Drift, last_success

log = logging.getLogger(__name__)

PROVIDER = "stripe"
EVENT_RETENTION = timedelta(days=30)
RECONCILE_RANK = 100
"""Outranks every event type of the same second (they rank 0–2)."""
TRACKED_THIN_OBJECTS = frozenset({"subscription"})


def client_for(api_key: str, api_base: str | None) -> stripe.StripeClient:
    """The official client; no SDK retries (the ApiCaller retries, honouring Retry-After)."""
    return stripe.StripeClient(api_key, base_addresses={"api": api_base} if api_base else None, max_network_retries=0)


def classify(error: Exception) -> Failure | None:
    if isinstance(error, stripe.RateLimitError):
        headers = error.headers or {}
        raw = headers.get("Retry-After") or headers.get("retry-after")
        return Failure(True, parse_retry_after(raw))
    if isinstance(error, stripe.APIConnectionError):
        return Failure(True)
    if isinstance(error, stripe.InvalidRequestError) and error.http_status == 404:
        return None  # the caller handles a missing object
    if isinstance(error, stripe.StripeError):
        return Failure((error.http_status or 0) >= 500)
    return None


def reconcile(ctx: RunContext, client: stripe.StripeClient) -> None:
    _failed_events(ctx, client)
    _thin_events(ctx, client)
    _subscriptions(ctx, client)


# --- events Stripe could not deliver -------------------------------------------------------------


def events_since(ctx: RunContext) -> datetime:
    """Since the last successful run (or --since), never further back than the 30 days Stripe keeps."""
    floor = utcnow() - EVENT_RETENTION
    since = ctx.since
    if since is None:
        with ctx.db.read() as session:
            since = last_success(session, PROVIDER)
    return max(since or floor, floor)


def _failed_events(ctx: RunContext, client: stripe.StripeClient) -> None:
    since = int(events_since(ctx).timestamp())
    params: dict[str, Any] = {"delivery_success": False, "created": {"gte": since}, "limit": PAGE_SIZE}
    page = ctx.caller(lambda: client.v1.events.list(params=params), "list undelivered events")  # type: ignore[arg-type]
    while True:
        _event_page(ctx, list(page.data))
        ctx.checkpoint("undelivered events")
        if not page.has_more:
            return
        current = page
        page = ctx.caller(current.next_page, "list undelivered events")


def _event_page(ctx: RunContext, events: list[Any]) -> None:
    if not events:
        return
    with ctx.db.read() as session:
        known = set(
            session.execute(
                select(InboxEvent.provider_event_id).where(
                    InboxEvent.provider == PROVIDER, InboxEvent.provider_event_id.in_([event.id for event in events])
                )
            ).scalars()
        )
    new_ids: list[int] = []
    for event in events:
        ctx.count("checked")
        if event.id in known:
            ctx.count("matched")
            continue
        ctx.count("drifted")
        action = "would ingest"
        if not ctx.dry_run:
            body = json.dumps(event.to_dict(for_json=True))
            inbox_id = store_event(ctx.db, provider=PROVIDER, event_id=event.id, event_type=event.type, body=body)
            action = "ingested"
            if inbox_id is not None:
                new_ids.append(inbox_id)
        ctx.drift(Drift("event", event.id, "delivery", "missing", event.type, action))
    if new_ids:
        outcome = processing.apply_events(ctx.db, ctx.catalogue, new_ids, max_attempts=ctx.settings.max_attempts)
        for status in outcome.statuses.values():
            ctx.count("repaired" if status in ("processed", "skipped") else "errors")


# --- thin events ---------------------------------------------------------------------------------


def _thin_events(ctx: RunContext, client: stripe.StripeClient) -> None:
    """Thin events stored and skipped: resolved when Tally tracks their object, else left with the reason."""
    after = 0
    while True:
        with ctx.db.read() as session:
            batch = session.execute(
                select(InboxEvent.id, InboxEvent.body)
                .where(
                    InboxEvent.provider == PROVIDER,
                    InboxEvent.status == "skipped",
                    InboxEvent.last_error.is_(None),
                    InboxEvent.body.contains(THIN_EVENT),
                    InboxEvent.id > after,
                )
                .order_by(InboxEvent.id)
                .limit(PAGE_SIZE)
            ).all()
        if not batch:
            return
        for inbox_id, body in batch:
            after = inbox_id
            _thin_event(ctx, client, inbox_id, body)
        ctx.checkpoint("thin events")


def _thin_event(ctx: RunContext, client: stripe.StripeClient, inbox_id: int, body: str) -> None:
    try:
        payload = json.loads(body)
    except ValueError:
        return
    if not isinstance(payload, dict) or payload.get("object") != THIN_EVENT:
        return
    related = payload.get("related_object") if isinstance(payload.get("related_object"), dict) else None
    object_type, object_id = (related or {}).get("type"), (related or {}).get("id")
    reason = None
    if not related or not isinstance(object_id, str):
        reason = "it names no related object"
    elif object_type not in TRACKED_THIN_OBJECTS:
        reason = f"Tally does not track {object_type} objects"
    else:
        with ctx.db.read() as session:
            if session.get(Subscription, object_id) is None:
                reason = f"Tally does not track subscription {object_id}"
    if reason is None:
        assert isinstance(object_id, str)
        try:
            live = ctx.caller(lambda: client.v1.subscriptions.retrieve(object_id), f"retrieve {object_id}")
        except stripe.InvalidRequestError:
            reason = f"subscription {object_id} no longer exists at Stripe"
        else:
            fetched_at = int(time.time())
            parsed = _parse(ctx, live.to_dict(), fetched_at)
            if parsed is not None:
                with ctx.db.read() as session:
                    row = session.get(Subscription, object_id)
                    has_grant = _granted(session, [parsed])
                _subscription(ctx, parsed, row, has_grant, fetched_at)
    if ctx.dry_run:
        return
    with ctx.db.write() as session:
        event = session.get(InboxEvent, inbox_id, with_for_update=True)
        if event is None:
            return
        if reason is None:
            event.status, event.processed_at, event.last_error = "processed", utcnow(), None
        else:
            event.last_error = f"thin event left skipped: {reason}"


# --- subscriptions -------------------------------------------------------------------------------


def _parse(ctx: RunContext, live: dict[str, Any], fetched_at: int) -> SubscriptionEvent | None:
    """A live subscription read through the webhook's own parser, as a snapshot event "as of the fetch"."""
    payload = {
        "id": ctx.watermark_id,
        "type": "customer.subscription.updated",
        "created": fetched_at,
        "data": {"object": live},
    }
    try:
        return parse_subscription_event(payload)
    except PayloadError as error:
        ctx.count("checked")
        ctx.count("errors")
        log.error("reconciliation run %s: subscription %s unreadable: %s", ctx.run_id, live.get("id"), error)
        return None


def _grant_key(snapshot: SubscriptionSnapshot) -> str | None:
    if snapshot.period_start is None:
        return None
    return f"period:{snapshot.id}:{snapshot.period_start.isoformat()}"


def _granted(session: Any, parsed: list[SubscriptionEvent]) -> set[str]:
    keys = [key for item in parsed if (key := _grant_key(item.snapshot)) is not None]
    if not keys:
        return set()
    return set(session.execute(select(Grant.source_key).where(Grant.source_key.in_(keys))).scalars())


def _subscriptions(ctx: RunContext, client: stripe.StripeClient) -> None:
    params: dict[str, Any] = {"status": "all", "limit": PAGE_SIZE}
    fetched_at = int(time.time())
    page = ctx.caller(lambda: client.v1.subscriptions.list(params=params), "list subscriptions")  # type: ignore[arg-type]
    while True:
        parsed = [item for live in page.data if (item := _parse(ctx, live.to_dict(), fetched_at)) is not None]
        ids = [live.id for live in page.data]
        with ctx.db.write() as session:
            ctx.recorder.saw(session, ids)
            rows = {
                row.id: row for row in session.execute(select(Subscription).where(Subscription.id.in_(ids))).scalars()
            }
            granted = _granted(session, parsed)
        for item in parsed:
            _subscription(ctx, item, rows.get(item.snapshot.id), granted, fetched_at)
        ctx.checkpoint("subscriptions")
        if not page.has_more:
            break
        current = page
        fetched_at = int(time.time())
        page = ctx.caller(current.next_page, "list subscriptions")
    report_unknown_subscriptions(ctx, PROVIDER, "Stripe")


def _fmt_time(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def _fields(status: str, price_id: str | None, start: datetime | None, end: datetime | None,
            cancel: bool, canceled_at: datetime | None) -> dict[str, str | None]:  # fmt: skip
    return {
        "status": status,
        "price": price_id,
        "current_period_start": _fmt_time(start),
        "current_period_end": _fmt_time(end),
        "cancel_at_period_end": "true" if cancel else "false",
        "canceled_at": _fmt_time(canceled_at),
    }


def snapshot_fields(snapshot: SubscriptionSnapshot) -> dict[str, str | None]:
    return _fields(
        snapshot.status,
        snapshot.price_id,
        snapshot.period_start,
        snapshot.period_end,
        snapshot.cancel_at_period_end,
        snapshot.canceled_at,
    )


def row_fields(row: Subscription) -> dict[str, str | None]:
    return _fields(
        row.status,
        row.price_id,
        row.current_period_start,
        row.current_period_end,
        row.cancel_at_period_end,
        row.canceled_at,
    )


def _subscription(
    ctx: RunContext, parsed: SubscriptionEvent, row: Subscription | None, granted: set[str], fetched_at: int
) -> None:
    """Compare one live subscription with Tally's and repair it in its own transaction."""
    ctx.count("checked")
    snapshot = parsed.snapshot
    context = HandlerContext(ctx.catalogue, utcnow())
    plan = resolve_plan(context, parsed.price)
    live = snapshot_fields(snapshot)
    drifts: list[tuple[str, str | None, str | None]] = []
    if row is None:
        drifts.append(("exists", "missing", f"{snapshot.status}"))
    else:
        held = row_fields(row)
        drifts.extend((name, held[name], live[name]) for name in live if held[name] != live[name])
    key = _grant_key(snapshot)
    owed = (
        plan is not None
        and snapshot.status in GRANTING_STATUSES
        and snapshot.period_end is not None
        and snapshot.period_end > context.now
        and key is not None
        and key not in granted
    )
    if not drifts and not owed:
        ctx.count("matched")
        return
    ctx.count("drifted")
    if ctx.dry_run:
        for name, held_value, live_value in drifts:
            ctx.drift(Drift("subscription", snapshot.id, name, held_value, live_value, "would repair"))
        if owed:
            ctx.drift(Drift("subscription", snapshot.id, "period_grant", "missing", live["current_period_start"],
                            "would grant"))  # fmt: skip
        return
    watermark = Watermark(at=fetched_at, rank=RECONCILE_RANK, event_id=ctx.watermark_id)
    try:
        with ctx.db.write() as session:
            applied = apply_subscription(
                session,
                snapshot,
                parsed.price,
                watermark,
                context,
                Source(description=f"reconciliation run {ctx.run_id}"),
            )
            now_granted = key is not None and find_entry(session, f"grant:{key}") is not None
    except ProviderUnavailable:
        raise
    except Exception as error:
        ctx.count("errors")
        log.exception("reconciliation run %s: repairing subscription %s failed", ctx.run_id, snapshot.id)
        for name, held_value, live_value in drifts:
            ctx.drift(Drift("subscription", snapshot.id, name, held_value, live_value, f"error: {error}"[:64]))
        return
    action = ("created" if row is None else "repaired") if applied else "kept: newer webhook"
    for name, held_value, live_value in drifts:
        ctx.drift(Drift("subscription", snapshot.id, name, held_value, live_value, action))
    if owed:
        ctx.drift(
            Drift(
                "subscription",
                snapshot.id,
                "period_grant",
                "missing",
                live["current_period_start"],
                "granted" if now_granted else "not granted",
            )
        )
    if applied:
        ctx.count("repaired")
