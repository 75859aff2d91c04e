"""Stripe events validated by pydantic against the shapes Tally reads, and turned into provider-neutral values.

Stripe renders `data.object` with the endpoint's API version: from 2025-03-31 the billing period lives
on subscription items and an invoice's subscription under `parent.subscription_details`; older
versions put them on the subscription and the invoice. Both are read.

The shapes take what Stripe actually sends: a related object as its id or expanded (`"cus_1"` or
`{"id": "cus_1", …}`), an absent or null container for "none" (`items`, `lines`, `parent`, `period`,
`pricing`), a price given as a string id or an object, and a quantity that is null, zero or not an
integer as 1. Any other value of the wrong type is a PayloadError naming its field.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple, Required, TypeVar

from pydantic import BeforeValidator, PlainValidator, TypeAdapter
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from app.billing.subscriptions import SubscriptionSnapshot
from app.errors import PayloadError
from app.providers.payloads import Int32, JsonObject, NonEmptyStr, UnixInstant, one_of, validate

SUBSCRIPTION_STATUSES = frozenset(
    {"incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused"}
)
THIN_EVENT = "v2.core.event"


# --- field types ---------------------------------------------------------------------------------


NOT_AN_ID = "must be an id, or an object with an id"


def _id(value: object) -> str:
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise PydanticCustomError("id_type", NOT_AN_ID)
    return value


def _optional_id(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise PydanticCustomError("id_type", NOT_AN_ID)
    return value


def _expandable(value: object) -> object:
    """`"price_1"` reads as `{"id": "price_1"}`; "" as null."""
    if isinstance(value, str):
        return {"id": value} if value else None
    return value


def _quantity(value: object) -> object:
    """Null, zero or anything but an integer reads as 1, the quantity Stripe means when it leaves it out."""
    return value if type(value) is int and value else 1


T = TypeVar("T")
Id = Annotated[str, PlainValidator(_id)]
"""A related object's id, given as the id or as the expanded object."""
OptionalId = Annotated[str | None, PlainValidator(_optional_id)]
Expandable = Annotated[T | None, BeforeValidator(_expandable)]
"""A related object, expanded or as its id alone."""


def _epoch(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


# --- shapes --------------------------------------------------------------------------------------
# Only the fields Tally reads; `total=False` fields may be absent, and null where typed `| None`.


class _Product(TypedDict, total=False):
    id: OptionalId
    metadata: JsonObject


class _Price(TypedDict, total=False):
    id: OptionalId
    product: Expandable[_Product]
    lookup_key: str | None
    metadata: JsonObject


class _Item(TypedDict, total=False):
    price: Expandable[_Price]
    plan: Expandable[_Price]  # API versions before prices
    quantity: Annotated[Int32, BeforeValidator(_quantity)]
    current_period_start: UnixInstant | None
    current_period_end: UnixInstant | None


class _Items(TypedDict, total=False):
    data: list[_Item] | None


class _Subscription(TypedDict, total=False):
    id: Required[Id]
    object: Literal["subscription"]
    customer: Required[Id]
    status: Required[Annotated[str, one_of(SUBSCRIPTION_STATUSES, "subscription status")]]
    items: _Items | None
    current_period_start: UnixInstant | None  # before API 2025-03-31
    current_period_end: UnixInstant | None
    cancel_at_period_end: bool | None
    canceled_at: UnixInstant | None
    ended_at: UnixInstant | None


class _PreviousItem(TypedDict, total=False):
    price: Expandable[_Price]
    current_period_start: UnixInstant | None
    current_period_end: UnixInstant | None


class _PreviousItems(TypedDict, total=False):
    data: list[_PreviousItem] | None


class _PreviousAttributes(TypedDict, total=False):
    """What an `updated` event changed from: only the fields present were changed."""

    status: str | None
    cancel_at_period_end: bool | None
    canceled_at: UnixInstant | None
    current_period_start: UnixInstant | None
    current_period_end: UnixInstant | None
    items: _PreviousItems | None


class _SubscriptionDetails(TypedDict, total=False):
    subscription: OptionalId


class _InvoiceParent(TypedDict, total=False):
    subscription_details: _SubscriptionDetails | None


class _LineParent(TypedDict, total=False):
    type: str | None


class _Period(TypedDict, total=False):
    start: UnixInstant | None
    end: UnixInstant | None


class _PriceDetails(TypedDict, total=False):
    price: OptionalId
    product: OptionalId


class _Pricing(TypedDict, total=False):
    price_details: _PriceDetails | None


class _Line(TypedDict, total=False):
    type: str | None  # before API 2025-03-31
    parent: _LineParent | None
    proration: bool | None
    period: _Period | None
    price: Expandable[_Price]  # before API 2025-03-31
    pricing: _Pricing | None


class _Lines(TypedDict, total=False):
    data: list[_Line] | None


class _Invoice(TypedDict, total=False):
    id: OptionalId  # required only of an invoice that pays a subscription period, as before
    customer: OptionalId
    parent: _InvoiceParent | None
    subscription: OptionalId  # before API 2025-03-31
    lines: _Lines | None


class _Customer(TypedDict, total=False):
    id: Required[NonEmptyStr]
    email: str | None
    name: str | None
    deleted: bool | None


class _Head(TypedDict, total=False):
    object: str
    type: Required[NonEmptyStr]


class _SubscriptionData(TypedDict, total=False):
    object: Required[_Subscription]
    previous_attributes: _PreviousAttributes | None


class _SubscriptionEvent(TypedDict):
    id: NonEmptyStr
    type: NonEmptyStr
    created: UnixInstant
    data: _SubscriptionData


class _InvoiceData(TypedDict):
    object: _Invoice


class _InvoiceEvent(TypedDict):
    id: NonEmptyStr
    type: NonEmptyStr
    created: UnixInstant
    data: _InvoiceData


class _CustomerData(TypedDict, total=False):
    object: Required[_Customer]
    previous_attributes: _PreviousAttributes | None


class _CustomerEvent(TypedDict):
    id: NonEmptyStr
    type: NonEmptyStr
    created: UnixInstant
    data: _CustomerData


HEAD = TypeAdapter(_Head)
SUBSCRIPTION_EVENT = TypeAdapter(_SubscriptionEvent)
INVOICE_EVENT = TypeAdapter(_InvoiceEvent)
CUSTOMER_EVENT = TypeAdapter(_CustomerEvent)


# --- provider-neutral values ---------------------------------------------------------------------


@dataclass(frozen=True)
class PriceRef:
    price_id: str | None
    product_id: str | None
    lookup_key: str | None
    metadata: dict[str, Any]


class EventInfo(NamedTuple):
    """What a snapshot event says of itself, for its watermark."""

    id: str
    type: str
    created: int  # unix seconds
    previous: dict[str, Any] | None  # normalised fields the event changed from (`previous_state`)


class SubscriptionEvent(NamedTuple):
    info: EventInfo
    snapshot: SubscriptionSnapshot
    price: PriceRef


class CustomerEvent(NamedTuple):
    info: EventInfo
    customer_id: str
    email: str | None
    name: str | None
    deleted: bool  # the customer object says so (a `customer.deleted` event says so by its type)


@dataclass(frozen=True)
class PaidPeriod:
    """A subscription period an invoice paid for."""

    invoice_id: str
    customer_id: str
    subscription_id: str
    start: datetime
    end: datetime
    price: PriceRef


# --- parsing -------------------------------------------------------------------------------------


def event_type(payload: object) -> str | None:
    """The event's type; None for a thin event, which carries no snapshot (reconciliation fetches it)."""
    head = validate(HEAD, payload)
    return None if head.get("object") == THIN_EVENT else head["type"]


def _price_ref(price: _Price | None) -> PriceRef:
    if price is None:
        return PriceRef(None, None, None, {})  # a fresh metadata dict each time: it is a mutable value
    product = price.get("product")
    metadata = price.get("metadata") or {}
    if product is not None and product.get("metadata"):  # an expanded product's metadata describes the plan too
        metadata = {**product["metadata"], **metadata}
    return PriceRef(price.get("id"), product.get("id") if product else None, price.get("lookup_key"), metadata)


PREVIOUS_FIELDS = ("status", "cancel_at_period_end", "canceled_at", "current_period_start", "current_period_end")


def previous_state(previous: _PreviousAttributes | None) -> dict[str, Any] | None:
    """The changed-from values of an `updated` event, in the normalised snapshot fields."""
    if previous is None:
        return None
    state: dict[str, Any] = {}
    for key in PREVIOUS_FIELDS:
        if key in previous:
            value = previous[key]  # type: ignore[literal-required]
            state[key] = _epoch(value) if isinstance(value, datetime) else value
    items = (previous.get("items") or {}).get("data")
    if items:
        item = items[0]
        for key in ("current_period_start", "current_period_end"):
            if key in item and key not in state:
                state[key] = _epoch(item[key])  # type: ignore[literal-required]
        price = item.get("price")
        if price is not None and price.get("id"):
            state["price_id"] = price["id"]
    return state or None


def _info(event: _SubscriptionEvent | _CustomerEvent) -> EventInfo:
    return EventInfo(
        id=event["id"],
        type=event["type"],
        created=int(event["created"].timestamp()),
        previous=previous_state(event["data"].get("previous_attributes")),
    )


def parse_subscription_event(payload: object) -> SubscriptionEvent:
    """A `customer.subscription.*` event: the subscription's snapshot and the price that names its plan."""
    event = validate(SUBSCRIPTION_EVENT, payload)
    sub = event["data"]["object"]
    items = (sub.get("items") or {}).get("data")
    item: _Item = items[0] if items else {}
    price = _price_ref(item.get("price") or item.get("plan"))
    # The subscription's own period (before API 2025-03-31) when it has the key at all, else the item's.
    periods = sub if "current_period_start" in sub else item
    period_ends = sub if "current_period_end" in sub else item
    snapshot = SubscriptionSnapshot(
        id=sub["id"],
        provider="stripe",
        customer_id=sub["customer"],
        status=sub["status"],
        product_id=price.product_id,
        price_id=price.price_id,
        quantity=item.get("quantity", 1),
        period_start=periods.get("current_period_start"),
        period_end=period_ends.get("current_period_end"),
        cancel_at_period_end=bool(sub.get("cancel_at_period_end")),
        canceled_at=sub.get("canceled_at"),
        ended_at=sub.get("ended_at"),
    )
    return SubscriptionEvent(info=_info(event), snapshot=snapshot, price=price)


def parse_customer_event(payload: object) -> CustomerEvent:
    """A `customer.*` event: the customer's snapshot."""
    event = validate(CUSTOMER_EVENT, payload)
    customer = event["data"]["object"]
    return CustomerEvent(
        info=_info(event),
        customer_id=customer["id"],
        email=customer.get("email"),
        name=customer.get("name"),
        deleted=bool(customer.get("deleted")),
    )


def parse_paid_invoice(payload: object) -> PaidPeriod | None:
    """The subscription period an `invoice.paid` event covers, or None for a one-off invoice."""
    invoice = validate(INVOICE_EVENT, payload)["data"]["object"]
    details = (invoice.get("parent") or {}).get("subscription_details") or {}
    subscription_id = details.get("subscription") or invoice.get("subscription")
    if subscription_id is None:
        return None
    for line in (invoice.get("lines") or {}).get("data") or ():
        is_subscription_line = line.get("type") == "subscription" or (
            (line.get("parent") or {}).get("type") == "subscription_item_details"
        )
        period = line.get("period") or {}
        start, end = period.get("start"), period.get("end")
        if not is_subscription_line or line.get("proration") or start is None or end is None:
            continue
        line_price = line.get("price")
        if line_price is not None:
            price = _price_ref(line_price)
        else:
            price_details = (line.get("pricing") or {}).get("price_details") or {}
            price = PriceRef(price_details.get("price"), price_details.get("product"), None, {})
        invoice_id, customer_id = invoice.get("id"), invoice.get("customer")
        if invoice_id is None or customer_id is None:
            raise PayloadError(f"data.object.{'customer' if invoice_id else 'id'}: {NOT_AN_ID}")
        return PaidPeriod(
            invoice_id=invoice_id,
            customer_id=customer_id,
            subscription_id=subscription_id,
            start=start,
            end=end,
            price=price,
        )
    return None
