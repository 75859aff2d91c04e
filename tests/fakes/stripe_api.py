"""A fake Stripe API for reconciliation tests, driven through the official `stripe` SDK.

    with StripeFake() as fake:
        sub = fake.create_subscription("cus_1", price="price_pro")
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": fake.url}, max_network_retries=0)
        ids = [s.id for s in client.v1.subscriptions.list(params={"status": "all"}).auto_paging_iter()]

What it models, and why:
- Subscriptions as a recent API version renders them (2025-03-31.basil and later): the billing period
  lives on `items.data[].current_period_start/end`, the price carries `product`, `lookup_key` and
  `metadata`. Objects are kept as small records and rendered on each request, so 50,000 of them fit
  in memory and a page costs the same wherever it starts.
- Lists in Stripe's order (newest `created` first, ties newest-inserted first) with
  `starting_after`/`ending_before` cursors found by bisection, `has_more`, and the list's own `url`,
  which the SDK's `auto_paging_iter()` requests for the next page.
- Events (`evt_…`) with a snapshot `data.object`, `data.previous_attributes`, a delivered flag behind
  `delivery_success=false` and `pending_webhooks`, and Stripe's 30-day listing window. v2 thin events
  behind `GET /v2/core/events/{id}`.
- Stripe's error JSON and statuses (404 `resource_missing`, 400 for unknown parameters, 401 without a
  secret key, 429 `rate_limit` with `Retry-After`, 5xx `api_error`), which the SDK maps to its
  exception classes.

Helpers change state the way Stripe would between two reconciliation runs (`create_subscription`,
`update_subscription`, `cancel_subscription`, `renew_subscription`, `add_event`), each emitting the
event Stripe would send; `delivered=False` leaves that event undelivered, as a lost webhook.
"""

from __future__ import annotations

import calendar
import json
import random
import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from ._server import JSON, FakeServer, Request, Response, abort, random_chars

__all__ = ["DEFAULT_API_VERSION", "SUBSCRIPTION_STATUSES", "StripeFake"]

DEFAULT_API_VERSION = "2025-03-31.basil"
SUBSCRIPTION_STATUSES = (
    "incomplete",
    "incomplete_expired",
    "trialing",
    "active",
    "past_due",
    "canceled",
    "unpaid",
    "paused",
)
EVENT_RETENTION_SECONDS = 30 * 86400
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)$")

T = TypeVar("T")


# -- records: what Stripe knows, kept small; the JSON is rendered per request ----------------------


@dataclass(slots=True)
class _Price:
    id: str
    product: str
    lookup_key: str | None
    metadata: dict[str, str]
    unit_amount: int
    currency: str
    interval: str
    interval_count: int
    created: int


@dataclass(slots=True)
class _Customer:
    id: str
    email: str | None
    name: str | None
    metadata: dict[str, str]
    created: int
    deleted: bool = False


@dataclass(slots=True)
class _Subscription:
    id: str
    customer: str
    item_id: str
    price: str
    quantity: int
    status: str
    created: int
    period_start: int
    period_end: int
    cancel_at_period_end: bool = False
    cancel_at: int | None = None
    canceled_at: int | None = None
    ended_at: int | None = None
    cancellation_reason: str | None = None
    trial_start: int | None = None
    trial_end: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    latest_invoice: str | None = None


@dataclass(slots=True)
class _Event:
    id: str
    type: str
    created: int
    delivered: bool
    api_version: str
    data_json: str  # the snapshot, fixed when the event is made, as Stripe's is

    def render(self) -> str:
        head = {
            "id": self.id,
            "object": "event",
            "api_version": self.api_version,
            "created": self.created,
            "livemode": False,
            "pending_webhooks": 0 if self.delivered else 1,
            "request": {"id": None, "idempotency_key": None},
            "type": self.type,
        }
        return json.dumps(head)[:-1] + ', "data": ' + self.data_json + "}"


class _Timeline(Generic[T]):
    """Records in Stripe's list order with O(log n) cursors.

    Kept ascending by (created, insertion sequence); a list page walks it downwards (newest first)
    from the cursor's position, so no request copies or sorts the whole collection.
    """

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []
        self.items: list[T] = []
        self.key_of: dict[str, tuple[int, int]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self.items)

    def add(self, object_id: str, created: int, item: T) -> None:
        key = (created, self._seq)
        self._seq += 1
        self.key_of[object_id] = key
        if not self.keys or key > self.keys[-1]:
            self.keys.append(key)
            self.items.append(item)
        else:
            at = bisect_left(self.keys, key)
            self.keys.insert(at, key)
            self.items.insert(at, item)

    def add_many(self, rows: Iterable[tuple[str, int, T]]) -> None:
        """Bulk insert, then one sort: seeding 50,000 records must not be quadratic."""
        for object_id, created, item in rows:
            key = (created, self._seq)
            self._seq += 1
            self.key_of[object_id] = key
            self.keys.append(key)
            self.items.append(item)
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        self.keys = [self.keys[i] for i in order]
        self.items = [self.items[i] for i in order]

    def index(self, object_id: str) -> int | None:
        key = self.key_of.get(object_id)
        return None if key is None else bisect_left(self.keys, key)

    def window(self, created: dict[str, int] | None, not_before: int | None = None) -> tuple[int, int]:
        """The index range [lo, hi) whose `created` satisfies Stripe's `created[gt|gte|lt|lte]` filter."""
        lo, hi = 0, len(self.keys)
        bounds = dict(created or {})
        if not_before is not None:
            bounds["gte"] = max(bounds.get("gte", not_before), not_before)
        if "gte" in bounds:
            lo = max(lo, bisect_left(self.keys, (bounds["gte"], -1)))
        if "gt" in bounds:
            lo = max(lo, bisect_left(self.keys, (bounds["gt"] + 1, -1)))
        if "lte" in bounds:
            hi = min(hi, bisect_left(self.keys, (bounds["lte"] + 1, -1)))
        if "lt" in bounds:
            hi = min(hi, bisect_left(self.keys, (bounds["lt"], -1)))
        return lo, hi

    def page(
        self,
        lo: int,
        hi: int,
        limit: int,
        match: Callable[[T], bool],
        *,
        starting_after: int | None = None,
        ending_before: int | None = None,
    ) -> tuple[list[T], bool]:
        """One page of at most `limit` matching records, newest first, and whether more lie beyond it."""
        found: list[T] = []
        if ending_before is not None:
            at = max(ending_before + 1, lo)
            while at < hi and len(found) <= limit:
                if match(self.items[at]):
                    found.append(self.items[at])
                at += 1
            has_more = len(found) > limit
            found = found[:limit]
            found.reverse()
            return found, has_more
        at = hi - 1 if starting_after is None else min(starting_after - 1, hi - 1)
        while at >= lo and len(found) <= limit:
            if match(self.items[at]):
                found.append(self.items[at])
            at -= 1
        return found[:limit], len(found) > limit


# -- the fake --------------------------------------------------------------------------------------


class StripeFake(FakeServer):
    """A fake Stripe API on 127.0.0.1 (see the module docstring).

    `api_key`: when given, only that secret key is accepted; otherwise any `sk_…`/`rk_…` bearer token.
    `clock`: the provider's "now" (seconds), used for default timestamps and the 30-day event window.
    `seed`: ids are random but reproducible from it.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_version: str = DEFAULT_API_VERSION,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.api_version = api_version
        self.clock = clock
        self._rng = random.Random(seed)
        self._ids: set[str] = set()
        self.prices: dict[str, _Price] = {}
        self.products: dict[str, JSON] = {}
        self.customers: dict[str, _Customer] = {}
        self.subscriptions: dict[str, _Subscription] = {}
        self.invoices: dict[str, JSON] = {}
        self.events: dict[str, _Event] = {}
        self.thin_events: dict[str, JSON] = {}
        self._subscription_order: _Timeline[_Subscription] = _Timeline()
        self._event_order: _Timeline[_Event] = _Timeline()

    # -- ids and time ----------------------------------------------------------------------------

    def now(self) -> int:
        return int(self.clock())

    def new_id(self, prefix: str) -> str:
        """A Stripe-looking id (`sub_1Ab…`), unique within this fake."""
        while True:
            candidate = f"{prefix}_1{random_chars(self._rng, 23)}"
            if candidate not in self._ids:
                self._ids.add(candidate)
                return candidate

    # -- seeding: catalogue and customers --------------------------------------------------------

    def add_product(
        self, product_id: str | None = None, *, name: str = "Plan", metadata: dict[str, str] | None = None
    ) -> JSON:
        with self.lock:
            product_id = product_id or self.new_id("prod")
            self.products[product_id] = {
                "id": product_id,
                "object": "product",
                "active": True,
                "created": self.now(),
                "default_price": None,
                "description": None,
                "images": [],
                "livemode": False,
                "marketing_features": [],
                "metadata": dict(metadata or {}),
                "name": name,
                "package_dimensions": None,
                "shippable": None,
                "statement_descriptor": None,
                "tax_code": None,
                "type": "service",
                "unit_label": None,
                "updated": self.now(),
                "url": None,
            }
            return self.products[product_id]

    def add_price(
        self,
        price_id: str | None = None,
        *,
        product: str | None = None,
        lookup_key: str | None = None,
        metadata: dict[str, str] | None = None,
        unit_amount: int = 1000,
        currency: str = "usd",
        interval: str = "month",
        interval_count: int = 1,
    ) -> JSON:
        """A recurring price; its product is created when unknown. `metadata` is where a plan can describe itself."""
        with self.lock:
            price_id = price_id or self.new_id("price")
            product = product or f"prod_{price_id.removeprefix('price_')}"
            if product not in self.products:
                self.add_product(product)
            self.prices[price_id] = _Price(
                price_id,
                product,
                lookup_key,
                dict(metadata or {}),
                unit_amount,
                currency,
                interval,
                interval_count,
                self.now(),
            )
            return self.render_price(self.prices[price_id])

    def add_customer(
        self,
        customer_id: str | None = None,
        *,
        email: str | None = None,
        name: str | None = None,
        metadata: dict[str, str] | None = None,
        created: int | None = None,
    ) -> JSON:
        with self.lock:
            customer_id = customer_id or self.new_id("cus")
            self.customers[customer_id] = _Customer(
                customer_id,
                email or f"{customer_id}@example.com",
                name,
                dict(metadata or {}),
                self.now() if created is None else created,
            )
            return self.render_customer(self.customers[customer_id])

    def delete_customer(self, customer_id: str, *, delivered: bool = True) -> None:
        """Stripe keeps a deleted customer as `{"id", "object", "deleted": true}` and sends `customer.deleted`."""
        with self.lock:
            customer = self._customer(customer_id)
            snapshot = self.render_customer(customer)
            customer.deleted = True
            self.add_event("customer.deleted", snapshot, delivered=delivered)

    def _ensure_customer(self, customer_id: str, created: int) -> None:
        if customer_id not in self.customers:
            self.customers[customer_id] = _Customer(customer_id, f"{customer_id}@example.com", None, {}, created)

    def _ensure_price(self, price_id: str) -> _Price:
        if price_id not in self.prices:
            self.add_price(price_id)
        return self.prices[price_id]

    # -- seeding: subscriptions ------------------------------------------------------------------

    def create_subscription(
        self,
        customer: str | None = None,
        price: str = "price_default",
        *,
        subscription_id: str | None = None,
        status: str = "active",
        quantity: int = 1,
        created: int | None = None,
        period_start: int | None = None,
        period_end: int | None = None,
        cancel_at_period_end: bool = False,
        trial_end: int | None = None,
        metadata: dict[str, str] | None = None,
        event: bool = True,
        delivered: bool = True,
    ) -> JSON:
        """A new subscription (and its customer and price when unknown), with `customer.subscription.created`.

        The period defaults to [created, created + one price interval). The first invoice exists
        (`latest_invoice`) but sends no event: use `renew_subscription` for paid renewals.
        """
        if status not in SUBSCRIPTION_STATUSES:
            raise ValueError(f"unknown subscription status {status!r}")
        with self.lock:
            created = self.now() if created is None else created
            customer = customer or self.new_id("cus")
            self._ensure_customer(customer, created)
            price_record = self._ensure_price(price)
            start = created if period_start is None else period_start
            end = (
                period_end
                if period_end is not None
                else add_interval(start, price_record.interval, price_record.interval_count)
            )
            record = _Subscription(
                id=subscription_id or self.new_id("sub"),
                customer=customer,
                item_id=self.new_id("si"),
                price=price,
                quantity=quantity,
                status=status,
                created=created,
                period_start=start,
                period_end=end,
                metadata=dict(metadata or {}),
                trial_start=created if trial_end is not None else None,
                trial_end=trial_end,
            )
            record.cancel_at_period_end = cancel_at_period_end
            record.cancel_at = end if cancel_at_period_end else None
            if record.id in self.subscriptions:
                raise ValueError(f"subscription {record.id} exists")
            self._ids.add(record.id)
            record.latest_invoice = self._make_invoice(record, "subscription_create", paid=status == "active")["id"]
            self.subscriptions[record.id] = record
            self._subscription_order.add(record.id, created, record)
            snapshot = self.render_subscription(record)
            if event:
                self.add_event("customer.subscription.created", snapshot, delivered=delivered, created=created)
            return snapshot

    def seed_subscriptions(
        self,
        n: int,
        *,
        price: str = "price_default",
        status: str | Sequence[str] = "active",
        created_start: int | None = None,
        customers: int | None = None,
    ) -> list[str]:
        """`n` subscriptions at once, without events (the state before the test starts), ids returned oldest first.

        `created` goes up one second per subscription from `created_start` (default: `n` seconds ago);
        `status` may be a sequence to cycle through; `customers` reuses that many customers round-robin
        (default: one customer each). Fast enough for 50,000 (one sort, no per-row rendering).
        """
        statuses = [status] if isinstance(status, str) else list(status)
        with self.lock:
            price_record = self._ensure_price(price)
            first = self.now() - n if created_start is None else created_start
            pool = customers or n
            customer_ids = [f"cus_seed{index:07d}" for index in range(pool)]
            for index, customer_id in enumerate(customer_ids):
                self._ensure_customer(customer_id, first + index)
            rows: list[tuple[str, int, _Subscription]] = []
            for index in range(n):
                created = first + index
                end = add_interval(created, price_record.interval, price_record.interval_count)
                record = _Subscription(
                    id=self.new_id("sub"),
                    customer=customer_ids[index % pool],
                    item_id=self.new_id("si"),
                    price=price,
                    quantity=1,
                    status=statuses[index % len(statuses)],
                    created=created,
                    period_start=created,
                    period_end=end,
                )
                self.subscriptions[record.id] = record
                rows.append((record.id, created, record))
            self._subscription_order.add_many(rows)
            return [row[0] for row in rows]

    def subscription(self, subscription_id: str) -> JSON:
        """The subscription as `GET /v1/subscriptions/{id}` renders it now."""
        with self.lock:
            return self.render_subscription(self._subscription(subscription_id))

    def update_subscription(
        self,
        subscription_id: str,
        *,
        status: str | None = None,
        price: str | None = None,
        quantity: int | None = None,
        cancel_at_period_end: bool | None = None,
        period_start: int | None = None,
        period_end: int | None = None,
        metadata: dict[str, str] | None = None,
        event_type: str | None = None,
        delivered: bool = True,
        event: bool = True,
    ) -> JSON:
        """Change fields as a dashboard or API update would; sends `customer.subscription.updated`
        (or `event_type`, e.g. `customer.subscription.paused`) with the changed top-level fields in
        `previous_attributes`."""
        with self.lock:
            record = self._subscription(subscription_id)
            before = self.render_subscription(record)
            if status is not None:
                if status not in SUBSCRIPTION_STATUSES:
                    raise ValueError(f"unknown subscription status {status!r}")
                record.status = status
            if price is not None:
                self._ensure_price(price)
                record.price = price
            if quantity is not None:
                record.quantity = quantity
            if period_start is not None:
                record.period_start = period_start
            if period_end is not None:
                record.period_end = period_end
            if cancel_at_period_end is not None:
                record.cancel_at_period_end = cancel_at_period_end
                record.cancel_at = record.period_end if cancel_at_period_end else None
                record.canceled_at = self.now() if cancel_at_period_end else None
                record.cancellation_reason = "cancellation_requested" if cancel_at_period_end else None
            if metadata is not None:
                record.metadata = dict(metadata)
            after = self.render_subscription(record)
            if event:
                self.add_event(
                    event_type or "customer.subscription.updated",
                    after,
                    previous_attributes=changed(before, after),
                    delivered=delivered,
                )
            return after

    def cancel_subscription(
        self, subscription_id: str, *, at_period_end: bool = False, delivered: bool = True, at: int | None = None
    ) -> JSON:
        """Cancel now (`customer.subscription.deleted`, status `canceled`) or at the period end (an update)."""
        if at_period_end:
            return self.update_subscription(subscription_id, cancel_at_period_end=True, delivered=delivered)
        with self.lock:
            record = self._subscription(subscription_id)
            moment = self.now() if at is None else at
            record.status = "canceled"
            record.canceled_at = record.canceled_at or moment
            record.ended_at = moment
            record.cancellation_reason = record.cancellation_reason or "cancellation_requested"
            snapshot = self.render_subscription(record)
            self.add_event("customer.subscription.deleted", snapshot, delivered=delivered, created=moment)
            return snapshot

    def renew_subscription(self, subscription_id: str, *, paid: bool = True, delivered: bool = True) -> JSON:
        """Move into the next period as Stripe does at a period end.

        Sends `customer.subscription.updated` (the old period in `previous_attributes.items`) and then
        `invoice.paid`, or `invoice.payment_failed` with the subscription `past_due` when `paid=False`.
        A subscription set to cancel at the period end is canceled instead (`customer.subscription.deleted`).
        """
        with self.lock:
            record = self._subscription(subscription_id)
            if record.status in {"canceled", "incomplete_expired"}:
                raise ValueError(f"subscription {subscription_id} has ended ({record.status})")
            if record.cancel_at_period_end:
                return self.cancel_subscription(subscription_id, delivered=delivered, at=record.period_end)
            before = self.render_subscription(record)
            price_record = self.prices[record.price]
            moment = record.period_end
            record.period_start = record.period_end
            record.period_end = add_interval(record.period_start, price_record.interval, price_record.interval_count)
            invoice = self._make_invoice(record, "subscription_cycle", paid=paid, created=moment)
            record.latest_invoice = invoice["id"]
            record.status = "active" if paid else "past_due"
            after = self.render_subscription(record)
            self.add_event(
                "customer.subscription.updated",
                after,
                previous_attributes=changed(before, after),
                delivered=delivered,
                created=moment,
            )
            self.add_event(
                "invoice.paid" if paid else "invoice.payment_failed", invoice, delivered=delivered, created=moment
            )
            return after

    def _make_invoice(
        self, record: _Subscription, billing_reason: str, *, paid: bool, created: int | None = None
    ) -> JSON:
        price = self.prices[record.price]
        created = record.created if created is None else created
        amount = price.unit_amount * record.quantity
        invoice_id = self.new_id("in")
        invoice: JSON = {
            "id": invoice_id,
            "object": "invoice",
            "account_country": "US",
            "account_name": "Fake Co",
            "amount_due": amount,
            "amount_overpaid": 0,
            "amount_paid": amount if paid else 0,
            "amount_remaining": 0 if paid else amount,
            "amount_shipping": 0,
            "application": None,
            "attempt_count": 1,
            "attempted": True,
            "auto_advance": not paid,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None, "status": None},
            "billing_reason": billing_reason,
            "collection_method": "charge_automatically",
            "created": created,
            "currency": price.currency,
            "customer": record.customer,
            "customer_email": None,
            "customer_name": None,
            "default_payment_method": None,
            "description": None,
            "discounts": [],
            "due_date": None,
            "effective_at": created,
            "ending_balance": 0,
            "hosted_invoice_url": None,
            "invoice_pdf": None,
            "issuer": {"type": "self"},
            "last_finalization_error": None,
            "livemode": False,
            "metadata": {},
            "lines": {
                "object": "list",
                "has_more": False,
                "total_count": 1,
                "url": f"/v1/invoices/{invoice_id}/lines",
                "data": [
                    {
                        "id": self.new_id("il"),
                        "object": "line_item",
                        "amount": amount,
                        "currency": price.currency,
                        "description": f"{record.quantity} x {price.product}",
                        "discount_amounts": [],
                        "discountable": True,
                        "discounts": [],
                        "invoice": invoice_id,
                        "livemode": False,
                        "metadata": {},
                        "parent": {
                            "type": "subscription_item_details",
                            "invoice_item_details": None,
                            "subscription_item_details": {
                                "invoice_item": None,
                                "proration": False,
                                "proration_details": {"credited_items": None},
                                "subscription": record.id,
                                "subscription_item": record.item_id,
                            },
                        },
                        "period": {"start": record.period_start, "end": record.period_end},
                        "pretax_credit_amounts": [],
                        "pricing": {
                            "type": "price_details",
                            "unit_amount_decimal": str(price.unit_amount),
                            "price_details": {"price": price.id, "product": price.product},
                        },
                        "quantity": record.quantity,
                        "taxes": [],
                    }
                ],
            },
            "next_payment_attempt": None,
            "number": None,
            "on_behalf_of": None,
            "parent": {
                "type": "subscription_details",
                "quote_details": None,
                "subscription_details": {"metadata": dict(record.metadata), "subscription": record.id},
            },
            "period_end": created,
            "period_start": created,
            "status": "paid" if paid else "open",
            "status_transitions": {
                "finalized_at": created,
                "marked_uncollectible_at": None,
                "paid_at": created if paid else None,
                "voided_at": None,
            },
            "subtotal": amount,
            "subtotal_excluding_tax": amount,
            "test_clock": None,
            "total": amount,
            "total_discount_amounts": [],
            "total_excluding_tax": amount,
            "total_pretax_credit_amounts": [],
            "total_taxes": [],
            "webhooks_delivered_at": created,
        }
        self.invoices[invoice_id] = invoice
        return invoice

    # -- seeding: events -------------------------------------------------------------------------

    def add_event(
        self,
        event_type: str,
        data_object: JSON,
        *,
        previous_attributes: JSON | None = None,
        delivered: bool = True,
        created: int | None = None,
        event_id: str | None = None,
    ) -> JSON:
        """A snapshot event; `delivered=False` makes it one `delivery_success=false` returns."""
        data: JSON = {"object": data_object}
        if previous_attributes is not None:
            data["previous_attributes"] = previous_attributes
        with self.lock:
            record = _Event(
                event_id or self.new_id("evt"),
                event_type,
                self.now() if created is None else created,
                delivered,
                self.api_version,
                json.dumps(data),
            )
            if record.id in self.events:
                raise ValueError(f"event {record.id} exists")
            self._ids.add(record.id)
            self.events[record.id] = record
            self._event_order.add(record.id, record.created, record)
            rendered: JSON = json.loads(record.render())
            return rendered

    def last_event(self) -> JSON:
        """The newest event as the API serves it (the one a helper just sent)."""
        with self.lock:
            newest: JSON = json.loads(self._event_order.items[-1].render())
            return newest

    def set_delivered(self, event_id: str, delivered: bool = True) -> None:
        """Mark an event delivered (a retry got through) or not (its last attempt failed)."""
        with self.lock:
            self.events[event_id].delivered = delivered

    def event_json(self, event_id: str) -> str:
        """The event's JSON text exactly as served (and as a webhook would carry it), ready to sign."""
        with self.lock:
            return self.events[event_id].render()

    def add_thin_event(
        self,
        event_type: str,
        related_object: JSON | None = None,
        *,
        data: JSON | None = None,
        created: int | None = None,
        event_id: str | None = None,
    ) -> JSON:
        """A v2 thin event, served at `GET /v2/core/events/{id}`; `related_object` is `{id, type, url}`."""
        with self.lock:
            event_id = event_id or self.new_id("evt")
            moment = datetime.fromtimestamp(self.now() if created is None else created, UTC)
            event: JSON = {
                "id": event_id,
                "object": "v2.core.event",
                "type": event_type,
                "created": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
                "livemode": False,
                "context": None,
                "reason": None,
                "changes": None,
            }
            if related_object is not None:
                event["related_object"] = dict(related_object)
            if data is not None:
                event["data"] = data
            self.thin_events[event_id] = event
            return dict(event)

    def thin_notification(self, event_id: str) -> JSON:
        """The webhook body of a thin event: the event without `data` (the receiver fetches it)."""
        with self.lock:
            return {key: value for key, value in self.thin_events[event_id].items() if key not in {"data", "changes"}}

    # -- rendering -------------------------------------------------------------------------------

    def render_price(self, price: _Price) -> JSON:
        return {
            "id": price.id,
            "object": "price",
            "active": True,
            "billing_scheme": "per_unit",
            "created": price.created,
            "currency": price.currency,
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": price.lookup_key,
            "metadata": dict(price.metadata),
            "nickname": None,
            "product": price.product,
            "recurring": {
                "interval": price.interval,
                "interval_count": price.interval_count,
                "meter": None,
                "trial_period_days": None,
                "usage_type": "licensed",
            },
            "tax_behavior": "unspecified",
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "recurring",
            "unit_amount": price.unit_amount,
            "unit_amount_decimal": str(price.unit_amount),
        }

    def render_customer(self, customer: _Customer) -> JSON:
        if customer.deleted:
            return {"id": customer.id, "object": "customer", "deleted": True}
        return {
            "id": customer.id,
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": customer.created,
            "currency": "usd",
            "customer_account": None,
            "default_source": None,
            "delinquent": False,
            "description": None,
            "discount": None,
            "email": customer.email,
            "invoice_prefix": "FAKE0001",
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": False,
            "metadata": dict(customer.metadata),
            "name": customer.name,
            "next_invoice_sequence": 2,
            "phone": None,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }

    def render_subscription(self, record: _Subscription) -> JSON:
        """The subscription as the API (and a snapshot event) renders it for a 2025-03-31+ API version."""
        price = self.prices[record.price]
        rendered_price = self.render_price(price)
        plan = {
            "id": price.id,
            "object": "plan",
            "active": True,
            "amount": price.unit_amount,
            "amount_decimal": str(price.unit_amount),
            "billing_scheme": "per_unit",
            "created": price.created,
            "currency": price.currency,
            "interval": price.interval,
            "interval_count": price.interval_count,
            "livemode": False,
            "metadata": dict(price.metadata),
            "meter": None,
            "nickname": None,
            "product": price.product,
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": "licensed",
        }
        item: JSON = {
            "id": record.item_id,
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": record.created,
            "current_period_end": record.period_end,
            "current_period_start": record.period_start,
            "discounts": [],
            "metadata": {},
            "plan": plan,
            "price": rendered_price,
            "quantity": record.quantity,
            "subscription": record.id,
            "tax_rates": [],
        }
        return {
            "id": record.id,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": record.created,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"flexible": None, "type": "classic"},
            "billing_thresholds": None,
            "cancel_at": record.cancel_at,
            "cancel_at_period_end": record.cancel_at_period_end,
            "canceled_at": record.canceled_at,
            "cancellation_details": {"comment": None, "feedback": None, "reason": record.cancellation_reason},
            "collection_method": "charge_automatically",
            "created": record.created,
            "currency": price.currency,
            "customer": record.customer,
            "customer_account": None,
            "days_until_due": None,
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "ended_at": record.ended_at,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {
                "object": "list",
                "data": [item],
                "has_more": False,
                "total_count": 1,
                "url": f"/v1/subscription_items?subscription={record.id}",
            },
            "latest_invoice": record.latest_invoice,
            "livemode": False,
            "metadata": dict(record.metadata),
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {
                "payment_method_options": None,
                "payment_method_types": None,
                "save_default_payment_method": "off",
            },
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "schedule": None,
            "start_date": record.created,
            "status": record.status,
            "test_clock": None,
            "transfer_data": None,
            "trial_end": record.trial_end,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": record.trial_start,
        }

    # -- the API ---------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> Response | None:
        header = request.header("authorization") or ""
        if not header.startswith("Bearer "):
            return self.error(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth "
                "(e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
            )
        key = header.removeprefix("Bearer ").strip()
        if (self.api_key is not None and key != self.api_key) or not key.startswith(("sk_", "rk_")):
            return self.error(401, f"Invalid API Key provided: {key[:8]}{'*' * max(len(key) - 12, 0)}{key[-4:]}")
        return None

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> Response:
        kind = "api_error" if status >= 500 else "invalid_request_error"
        body: JSON = {"message": message, "type": kind}
        if code is not None:
            body["code"] = code
            body["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
        if param is not None:
            body["param"] = param
        return Response(status, {"error": body}, {"Request-Id": f"req_fake{self.calls:06d}"})

    def fault_response(self, status: int) -> Response:
        if status == 429:
            return self.error(
                429,
                "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
                code="rate_limit",
            )
        if status >= 500:
            return self.error(status, "An unknown error occurred. Please try again later.")
        return self.error(status, f"Injected HTTP {status}")

    def route(self, request: Request) -> Response:
        if request.method != "GET":
            return self.error(
                404, f"Unrecognized request URL ({request.method}: {request.path}). The fake serves GET only."
            )
        params = stripe_params(request.query)
        path = request.path
        if path == "/v1/subscriptions":
            return self._list_subscriptions(params)
        if path == "/v1/events":
            return self._list_events(params)
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "v1":
            resource, object_id = parts[1], parts[2]
            self._allow(params, {"expand"})
            if resource == "subscriptions":
                record = self.subscriptions.get(object_id)
                if record is None:
                    raise self._missing("subscription", object_id)
                return Response(200, self._expand(self.render_subscription(record), _expansions(params, False)))
            if resource == "events":
                event = self.events.get(object_id)
                if event is None or event.created < self.now() - EVENT_RETENTION_SECONDS:
                    raise self._missing("event", object_id)
                return Response(200, event.render())
            if resource == "customers":
                return Response(200, self.render_customer(self._customer(object_id, for_api=True)))
            if resource == "invoices":
                invoice = self.invoices.get(object_id)
                if invoice is None:
                    raise self._missing("invoice", object_id)
                return Response(200, invoice)
            if resource == "prices":
                price = self.prices.get(object_id)
                if price is None:
                    raise self._missing("price", object_id)
                return Response(200, self.render_price(price))
            if resource == "products":
                product = self.products.get(object_id)
                if product is None:
                    raise self._missing("product", object_id)
                return Response(200, product)
        if len(parts) == 4 and parts[:3] == ["v2", "core", "events"]:
            thin = self.thin_events.get(parts[3])
            if thin is None:
                raise abort(self.error(404, f"No such event: '{parts[3]}'", code="resource_missing"))
            return Response(200, thin)
        return self.error(
            404,
            f"Unrecognized request URL (GET: {path}). Please see https://stripe.com/docs "
            "or we can help at https://support.stripe.com/.",
        )

    def _list_subscriptions(self, params: JSON) -> Response:
        self._allow(
            params,
            {
                "automatic_tax",
                "collection_method",
                "created",
                "current_period_end",
                "current_period_start",
                "customer",
                "customer_account",
                "ending_before",
                "expand",
                "limit",
                "plan",
                "price",
                "starting_after",
                "status",
                "test_clock",
            },
        )
        for unsupported in (
            "automatic_tax",
            "collection_method",
            "current_period_end",
            "current_period_start",
            "customer_account",
            "test_clock",
        ):
            if unsupported in params:
                raise abort(self.error(400, f"The fake does not implement the {unsupported} filter", param=unsupported))
        status = params.get("status")
        if status is not None and status not in (*SUBSCRIPTION_STATUSES, "all", "ended"):
            raise abort(
                self.error(
                    400,
                    f"Invalid status: must be one of {', '.join(SUBSCRIPTION_STATUSES)}, all or ended",
                    param="status",
                )
            )
        customer = params.get("customer")
        price = params.get("price") or params.get("plan")

        def match(record: _Subscription) -> bool:
            if status is None and record.status == "canceled":
                return False  # Stripe's default: every subscription that is not canceled
            if status == "ended" and record.status not in {"canceled", "incomplete_expired"}:
                return False
            if status not in (None, "all", "ended") and record.status != status:
                return False
            if customer is not None and record.customer != customer:
                return False
            return price is None or record.price == price

        expansions = _expansions(params, True)
        records, has_more = self._page(self._subscription_order, params, match, "subscription")
        data = [self._expand(self.render_subscription(record), expansions) for record in records]
        return Response(200, {"object": "list", "data": data, "has_more": has_more, "url": "/v1/subscriptions"})

    def _list_events(self, params: JSON) -> Response:
        self._allow(
            params,
            {"created", "delivery_success", "ending_before", "expand", "limit", "starting_after", "type", "types"},
        )
        if "type" in params and "types" in params:
            raise abort(self.error(400, "You may pass either `type` or `types`, but not both.", param="types"))
        delivery = params.get("delivery_success")
        if delivery not in (None, "true", "false"):
            raise abort(self.error(400, f"Invalid boolean: {delivery}", param="delivery_success"))
        wanted_types = params.get("types")
        if wanted_types is not None and not isinstance(wanted_types, list):
            raise abort(self.error(400, "Invalid array", param="types"))
        pattern = params.get("type")
        type_re = re.compile("^" + ".*".join(map(re.escape, str(pattern).split("*"))) + "$") if pattern else None

        def match(event: _Event) -> bool:
            if delivery is not None and event.delivered != (delivery == "true"):
                return False
            if wanted_types is not None and event.type not in wanted_types:
                return False
            return type_re is None or bool(type_re.match(event.type))

        events, has_more = self._page(
            self._event_order, params, match, "event", not_before=self.now() - EVENT_RETENTION_SECONDS
        )
        body = (
            '{"object": "list", "data": ['
            + ", ".join(event.render() for event in events)
            + '], "has_more": '
            + json.dumps(has_more)
            + ', "url": "/v1/events"}'
        )
        return Response(200, body)

    def _page(
        self,
        timeline: _Timeline[T],
        params: JSON,
        match: Callable[[T], bool],
        noun: str,
        *,
        not_before: int | None = None,
    ) -> tuple[list[T], bool]:
        limit = self._limit(params.get("limit"))
        lo, hi = timeline.window(self._created(params.get("created")), not_before)
        cursors: dict[str, int | None] = {}
        for name in ("starting_after", "ending_before"):
            object_id = params.get(name)
            if object_id is None:
                continue
            at = timeline.index(str(object_id))
            if at is None:
                raise abort(self.error(400, f"No such {noun}: '{object_id}'", code="resource_missing", param=name))
            cursors[name] = at
        return timeline.page(
            lo,
            hi,
            limit,
            match,
            starting_after=cursors.get("starting_after"),
            ending_before=cursors.get("ending_before"),
        )

    def _limit(self, raw: Any) -> int:
        if raw is None:
            return 10
        try:
            limit = int(raw)
        except (TypeError, ValueError):
            raise abort(self.error(400, f"Invalid integer: {raw}", param="limit")) from None
        if limit < 1:
            raise abort(self.error(400, "This value must be greater than or equal to 1.", param="limit"))
        if limit > 100:
            raise abort(self.error(400, "This value must be less than or equal to 100.", param="limit"))
        return limit

    def _created(self, raw: Any) -> dict[str, int] | None:
        if raw is None:
            return None
        try:
            if isinstance(raw, dict):
                unknown = set(raw) - {"gt", "gte", "lt", "lte"}
                if unknown:
                    raise abort(
                        self.error(400, f"Received unknown parameter: created[{min(unknown)}]", param="created")
                    )
                return {key: int(value) for key, value in raw.items()}
            exact = int(raw)
        except (TypeError, ValueError):
            raise abort(self.error(400, f"Invalid timestamp: {raw}", param="created")) from None
        return {"gte": exact, "lte": exact}

    def _allow(self, params: JSON, allowed: set[str]) -> None:
        for name in params:
            if name not in allowed:
                raise abort(self.error(400, f"Received unknown parameter: {name}", param=name))

    def _expand(self, subscription: JSON, expansions: list[str]) -> JSON:
        for path in expansions:
            if path == "customer":
                subscription["customer"] = self.render_customer(self._customer(subscription["customer"]))
            elif path == "latest_invoice":
                invoice_id = subscription["latest_invoice"]
                subscription["latest_invoice"] = self.invoices.get(invoice_id) if invoice_id else None
            elif path in {"items.data.price.product", "items.data.plan.product"}:
                for item in subscription["items"]["data"]:
                    owner = item["price"] if ".price." in path else item["plan"]
                    owner["product"] = self.products[owner["product"]]
            else:
                raise abort(self.error(400, f"This property cannot be expanded ({path}).", param="expand"))
        return subscription

    def _subscription(self, subscription_id: str) -> _Subscription:
        record = self.subscriptions.get(subscription_id)
        if record is None:
            raise KeyError(f"no subscription {subscription_id}")
        return record

    def _customer(self, customer_id: str, *, for_api: bool = False) -> _Customer:
        customer = self.customers.get(customer_id)
        if customer is None:
            if for_api:
                raise self._missing("customer", customer_id)
            raise KeyError(f"no customer {customer_id}")
        return customer

    def _missing(self, noun: str, object_id: str) -> Exception:
        return abort(self.error(404, f"No such {noun}: '{object_id}'", code="resource_missing", param="id"))


# -- helpers -------------------------------------------------------------------------------------


def stripe_params(query: Sequence[tuple[str, str]]) -> JSON:
    """Stripe's form-encoded query folded back into values: `created[gte]=1` → {"created": {"gte": "1"}},
    `expand[0]=a&expand[1]=b` (or `expand[]=`) → {"expand": ["a", "b"]}."""
    root: JSON = {}
    for key, value in query:
        found = _KEY.match(key)
        if found is None:
            root[key] = value
            continue
        parts = [found.group(1), *_BRACKETS.findall(found.group(2))]
        node = root
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        last = parts[-1] if parts[-1] != "" else str(len(node))
        node[last] = value
    folded: JSON = _listify(root)
    return folded


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {key: _listify(value) for key, value in node.items()}
    if converted and all(key.isdigit() for key in converted):
        return [converted[key] for key in sorted(converted, key=int)]
    return converted


def _expansions(params: JSON, is_list: bool) -> list[str]:
    raw = params.get("expand", [])
    paths = [raw] if isinstance(raw, str) else list(raw)
    if not is_list:
        return paths
    result = []
    for path in paths:
        if not path.startswith("data."):
            raise abort(
                Response(
                    400,
                    {
                        "error": {
                            "type": "invalid_request_error",
                            "param": "expand",
                            "message": f"This property cannot be expanded ({path}).",
                        }
                    },
                )
            )
        result.append(path.removeprefix("data."))
    return result


def add_interval(moment: int, interval: str, count: int = 1) -> int:
    """`moment` plus `count` billing intervals, by the calendar (a month from Jan 31 is Feb 28/29), in UTC."""
    start = datetime.fromtimestamp(moment, UTC)
    if interval == "day":
        return moment + 86400 * count
    if interval == "week":
        return moment + 7 * 86400 * count
    months = count * (12 if interval == "year" else 1)
    if interval not in {"month", "year"}:
        raise ValueError(f"unknown interval {interval!r}")
    month_index = start.month - 1 + months
    year, month = start.year + month_index // 12, month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


def changed(before: JSON, after: JSON) -> JSON:
    """`previous_attributes` as Stripe sends it: the top-level fields that changed, with their old values."""
    return {key: value for key, value in before.items() if after.get(key) != value}
