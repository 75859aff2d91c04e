"""Dodo Payments events validated by pydantic against the shapes Tally reads, and turned into plain values.

The SDK's `webhooks.unwrap` verifies but does not validate, and maps unknown types to unrelated
models, so each event Tally uses is validated here, envelope and data, against a shape of the fields
Tally relies on. Anything missing or of the wrong type raises PayloadError (the event is
dead-lettered, not retried). Amounts are decimal strings (or JSON integers) converted exactly, never
through float.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, NamedTuple, Required, TypeVar

from pydantic import PlainValidator, TypeAdapter
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from app.billing.subscriptions import SubscriptionSnapshot
from app.ledger.amounts import parse_decimal, to_atoms
from app.ledger.mirror import MIRROR_PRECISION, ProviderEntry
from app.providers.payloads import Instant, Int32, Int64, JsonObject, NonEmptyStr, one_of, validate

PROVIDER = "dodo"

SUBSCRIPTION_STATUSES = frozenset(
    {"pending", "active", "on_hold", "paused", "cancelled", "failed", "expired", "past_due"}
)
ENDED_STATUSES = frozenset({"cancelled", "expired", "failed"})

# Dodo's transaction types, and the kind of Tally ledger entry each one is.
ENTRY_KINDS = {
    "credit_added": "grant",
    "auto_top_up": "grant",
    "credit_deducted": "deduction",
    "credit_expired": "expiry",
    "rollover_forfeited": "expiry",
    "credit_rolled_over": "rollover",
    "overage_charged": "overage_charge",
    "overage_reset": "overage_reset",
    "manual_adjustment": "manual_adjustment",
    "refund": "refund",
}


# --- amounts -------------------------------------------------------------------------------------


class Amount(NamedTuple):
    """A decimal from the provider, its atoms at the mirror precision, and how many places it used.

    A NamedTuple, not a frozen dataclass: as immutable, and half the cost on the workers' hot path.
    """

    value: Decimal
    atoms: int
    places: int


def parse_amount(value: object, *, allow_negative: bool = False) -> Amount:
    """Raises a ValueError (AmountError) or a pydantic error, so that validation names the field."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PydanticCustomError("decimal_type", "must be a decimal string")
    number = parse_decimal(value)
    atoms = to_atoms(number, MIRROR_PRECISION)
    if number < 0 and not allow_negative:
        raise ValueError("must not be negative")
    exponent = number.as_tuple().exponent
    # Past the mirror precision only zeros can follow (to_atoms checked), and responses never show them:
    # the cap keeps `0E-99999999999` from asking for that many places (an INTEGER column).
    places = min(max(0, -exponent), MIRROR_PRECISION) if isinstance(exponent, int) else 0
    return Amount(number, atoms, places)


def _decimal_text(value: object) -> str:
    parse_amount(value)
    return str(value)


def _signed_decimal_text(value: object) -> str:
    parse_amount(value, allow_negative=True)
    return str(value)


AmountField = Annotated[Amount, PlainValidator(parse_amount)]
DecimalText = Annotated[str, PlainValidator(_decimal_text)]
"""A non-negative amount validated like the others, but kept as the provider wrote it."""
SignedDecimalText = Annotated[str, PlainValidator(_signed_decimal_text)]
ZERO = Amount(Decimal(0), 0, 0)


# --- shapes --------------------------------------------------------------------------------------
# Only the fields Tally reads; `total=False` fields may be absent, and null where typed `| None`.


class _AnyObject(TypedDict):
    """Any JSON object, checked as one without copying its fields."""


class _Envelope(TypedDict):
    type: NonEmptyStr
    data: _AnyObject


class _LedgerEntry(TypedDict, total=False):
    id: Required[NonEmptyStr]
    customer_id: Required[NonEmptyStr]
    credit_entitlement_id: Required[NonEmptyStr]
    transaction_type: Required[Annotated[NonEmptyStr, one_of(ENTRY_KINDS, "transaction_type")]]
    amount: Required[AmountField]
    is_credit: Required[bool]
    balance_before: Required[AmountField]
    balance_after: Required[AmountField]
    overage_before: Required[AmountField]
    overage_after: Required[AmountField]
    created_at: Required[Instant]
    grant_id: str | None
    description: str | None
    reference_type: str | None
    reference_id: str | None
    metadata: JsonObject
    brand_id: str | None
    business_id: str | None


class _BalanceLow(TypedDict, total=False):
    customer_id: Required[NonEmptyStr]
    subscription_id: str | None
    credit_entitlement_id: Required[NonEmptyStr]
    credit_entitlement_name: str | None
    available_balance: Required[SignedDecimalText]
    subscription_credits_amount: str | None
    threshold_percent: Int32 | None
    threshold_amount: str | None


class _Customer(TypedDict, total=False):
    customer_id: Required[NonEmptyStr]
    email: str | None
    name: str | None


class _CartLine(TypedDict, total=False):
    credit_entitlement_id: Required[NonEmptyStr]
    credit_entitlement_name: str | None
    unit: str | None
    product_id: str | None
    credits_amount: AmountField  # absent means 0; null is refused, as before
    overage_enabled: Required[bool]
    overage_limit: AmountField | None
    overage_behavior: str | None
    rollover_enabled: bool
    remaining_balance: AmountField | None
    overage_balance: AmountField | None


class _Meter(TypedDict, total=False):
    meter_id: Required[NonEmptyStr]
    name: str | None
    description: str | None
    currency: str | None
    free_threshold: Int64 | None
    measurement_unit: str | None
    price_per_unit: DecimalText | None


class _MeterCredit(TypedDict, total=False):
    meter_id: Required[NonEmptyStr]
    credit_entitlement_id: Required[NonEmptyStr]
    meter_name: str | None
    meter_units_per_credit: Required[DecimalText]


class _Subscription(TypedDict, total=False):
    subscription_id: Required[NonEmptyStr]
    status: Required[Annotated[str, one_of(SUBSCRIPTION_STATUSES, "subscription status")]]
    customer: Required[_Customer]
    product_id: str | None
    quantity: Int32 | None
    previous_billing_date: Required[Instant]
    next_billing_date: Required[Instant]
    cancel_at_next_billing_date: bool  # absent means false; null is refused, as before
    cancelled_at: Instant | None
    expires_at: Instant | None
    credit_entitlement_cart: list[_CartLine] | None
    meters: list[_Meter] | None
    meter_credit_entitlement_cart: list[_MeterCredit] | None


class _PaymentCustomer(TypedDict, total=False):
    customer_id: str | None


class _Payment(TypedDict, total=False):
    payment_id: Required[NonEmptyStr]
    customer: _PaymentCustomer | None
    subscription_id: str | None
    status: str | None
    total_amount: Int64 | None
    currency: str | None
    created_at: Instant | None


class _Refund(TypedDict, total=False):
    refund_id: Required[NonEmptyStr]
    payment_id: str | None
    customer: _PaymentCustomer | None
    subscription_id: str | None
    status: str | None
    amount: Int64 | None
    currency: str | None
    created_at: Instant | None


D = TypeVar("D")


class _Event(TypedDict, Generic[D], total=False):
    type: Required[NonEmptyStr]
    timestamp: Instant | None  # not used to order anything (see the handlers), but it must be a time
    data: Required[D]


ENVELOPE = TypeAdapter(_Envelope)
LEDGER_EVENT = TypeAdapter(_Event[_LedgerEntry])
BALANCE_LOW_EVENT = TypeAdapter(_Event[_BalanceLow])
SUBSCRIPTION_EVENT = TypeAdapter(_Event[_Subscription])
PAYMENT_EVENT = TypeAdapter(_Event[_Payment])
REFUND_EVENT = TypeAdapter(_Event[_Refund])


# --- the envelope --------------------------------------------------------------------------------


def event_type(payload: object) -> str:
    """The event's type, from an envelope whose `data` is an object (whatever the type)."""
    return validate(ENVELOPE, payload)["type"]


# --- credit ledger entries -----------------------------------------------------------------------


def parse_ledger_entry(payload: object) -> ProviderEntry:
    """A `credit.*` event's ledger entry (every type except `credit.balance_low`)."""
    data = validate(LEDGER_EVENT, payload)["data"]
    extra: dict[str, Any] = {"metadata": data.get("metadata") or {}}
    for key in ("brand_id", "business_id"):
        if data.get(key) is not None:
            extra[key] = data[key]
    amount, balance_before, balance_after = data["amount"], data["balance_before"], data["balance_after"]
    overage_before, overage_after = data["overage_before"], data["overage_after"]
    return ProviderEntry(
        provider=PROVIDER,
        external_id=data["id"],
        customer_id=data["customer_id"],
        entitlement_id=data["credit_entitlement_id"],
        kind=ENTRY_KINDS[data["transaction_type"]],
        transaction_type=data["transaction_type"],
        is_credit=data["is_credit"],
        amount=amount.atoms,
        balance_before=balance_before.atoms,
        balance_after=balance_after.atoms,
        overage_before=overage_before.atoms,
        overage_after=overage_after.atoms,
        created_at=data["created_at"],
        description=data.get("description"),
        provider_grant_id=data.get("grant_id"),
        reference_type=data.get("reference_type"),
        reference_id=data.get("reference_id"),
        extra=extra,
        display_precision=max(
            amount.places, balance_before.places, balance_after.places, overage_before.places, overage_after.places
        ),
    )


@dataclass(frozen=True)
class BalanceLow:
    customer_id: str
    subscription_id: str | None
    entitlement_id: str
    entitlement_name: str | None
    available_balance: str
    subscription_credits_amount: str | None
    threshold_percent: int | None
    threshold_amount: str | None


def parse_balance_low(payload: object) -> BalanceLow:
    """A `credit.balance_low` alert; the available balance is validated and kept as sent."""
    data = validate(BALANCE_LOW_EVENT, payload)["data"]
    return BalanceLow(
        customer_id=data["customer_id"],
        subscription_id=data.get("subscription_id"),
        entitlement_id=data["credit_entitlement_id"],
        entitlement_name=data.get("credit_entitlement_name"),
        available_balance=data["available_balance"],
        subscription_credits_amount=data.get("subscription_credits_amount"),
        threshold_percent=data.get("threshold_percent"),
        threshold_amount=data.get("threshold_amount"),
    )


# --- subscriptions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CartLine:
    """One `credit_entitlement_cart[]` line, amounts at the mirror precision."""

    entitlement_id: str
    name: str
    unit: str
    product_id: str | None
    credits_amount: Amount
    overage_enabled: bool
    overage_limit: Amount | None
    overage_behavior: str | None
    rollover_enabled: bool
    remaining_balance: Amount | None
    overage_balance: Amount | None

    @property
    def places(self) -> int:
        amounts = (self.credits_amount, self.overage_limit, self.remaining_balance, self.overage_balance)
        return max(amount.places for amount in amounts if amount is not None)


@dataclass(frozen=True)
class MeterLine:
    meter_id: str
    name: str
    description: str | None
    currency: str | None
    free_threshold: int
    measurement_unit: str | None
    price_per_unit: str | None


@dataclass(frozen=True)
class MeterCreditLine:
    meter_id: str
    entitlement_id: str
    meter_name: str | None
    meter_units_per_credit: str


@dataclass(frozen=True)
class DodoSubscription:
    snapshot: SubscriptionSnapshot
    customer_email: str | None
    customer_name: str | None
    cart: list[CartLine]
    meters: list[MeterLine]
    meter_credits: list[MeterCreditLine]


def _cart_line(line: _CartLine) -> CartLine:
    return CartLine(
        entitlement_id=line["credit_entitlement_id"],
        name=line.get("credit_entitlement_name") or line["credit_entitlement_id"],
        unit=line.get("unit") or "credits",
        product_id=line.get("product_id"),
        credits_amount=line.get("credits_amount", ZERO),
        overage_enabled=line["overage_enabled"],
        overage_limit=line.get("overage_limit"),
        overage_behavior=line.get("overage_behavior"),
        rollover_enabled=line.get("rollover_enabled", False),
        remaining_balance=line.get("remaining_balance"),
        overage_balance=line.get("overage_balance"),
    )


def _meter_line(meter: _Meter) -> MeterLine:
    return MeterLine(
        meter_id=meter["meter_id"],
        name=meter.get("name") or meter["meter_id"],
        description=meter.get("description"),
        currency=meter.get("currency"),
        free_threshold=meter.get("free_threshold") or 0,
        measurement_unit=meter.get("measurement_unit"),
        price_per_unit=meter.get("price_per_unit"),
    )


def parse_subscription(payload: object) -> DodoSubscription:
    """A `subscription.*` event: the snapshot, its customer, and its entitlement cart and meters."""
    data = validate(SUBSCRIPTION_EVENT, payload)["data"]
    customer, status, quantity = data["customer"], data["status"], data.get("quantity")
    cancelled_at = data.get("cancelled_at")
    snapshot = SubscriptionSnapshot(
        id=data["subscription_id"],
        provider=PROVIDER,
        customer_id=customer["customer_id"],
        status=status,
        product_id=data.get("product_id"),
        price_id=None,
        quantity=quantity if quantity is not None else 1,
        period_start=data["previous_billing_date"],
        period_end=data["next_billing_date"],
        cancel_at_period_end=data.get("cancel_at_next_billing_date", False),
        canceled_at=cancelled_at,
        ended_at=(cancelled_at or data.get("expires_at")) if status in ENDED_STATUSES else None,
    )
    return DodoSubscription(
        snapshot=snapshot,
        customer_email=customer.get("email"),
        customer_name=customer.get("name"),
        cart=[_cart_line(line) for line in data.get("credit_entitlement_cart") or ()],
        meters=[_meter_line(meter) for meter in data.get("meters") or ()],
        meter_credits=[
            MeterCreditLine(
                meter_id=link["meter_id"],
                entitlement_id=link["credit_entitlement_id"],
                meter_name=link.get("meter_name"),
                meter_units_per_credit=link["meter_units_per_credit"],
            )
            for link in data.get("meter_credit_entitlement_cart") or ()
        ],
    )


# --- payments and refunds ------------------------------------------------------------------------


@dataclass(frozen=True)
class PaymentState:
    kind: str  # payment | refund
    object_id: str
    payment_id: str | None
    customer_id: str | None
    subscription_id: str | None
    status: str | None
    amount: int | None
    currency: str | None
    created_at: datetime | None


def parse_payment_or_refund(kind: str, payload: object) -> PaymentState:
    """A `payment.*` or `refund.*` event (`kind` says which)."""
    data: _Payment | _Refund
    if kind == "refund":
        data = refund = validate(REFUND_EVENT, payload)["data"]
        object_id, payment_id, amount = refund["refund_id"], refund.get("payment_id"), refund.get("amount")
    else:
        data = payment = validate(PAYMENT_EVENT, payload)["data"]
        object_id, payment_id, amount = payment["payment_id"], None, payment.get("total_amount")
    return PaymentState(
        kind=kind,
        object_id=object_id,
        payment_id=payment_id,
        customer_id=(data.get("customer") or {}).get("customer_id"),
        subscription_id=data.get("subscription_id"),
        status=data.get("status"),
        amount=amount,
        currency=data.get("currency"),
        created_at=data.get("created_at"),
    )
