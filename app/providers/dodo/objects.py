"""Reading Dodo Payments webhook JSON into plain, validated values.

The SDK's `webhooks.unwrap` verifies but does not validate, and maps unknown types to unrelated
models, so the fields Tally relies on are checked here, one by one. Anything missing or of the wrong
type raises PayloadError (the event is dead-lettered, not retried). Amounts are decimal strings and
are converted exactly (never through float).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from app.billing.subscriptions import SubscriptionSnapshot
from app.errors import PayloadError
from app.ledger.amounts import AmountError, parse_decimal, to_atoms
from app.ledger.mirror import MIRROR_PRECISION, ProviderEntry

PROVIDER = "dodo"

SUBSCRIPTION_STATUSES = frozenset(
    {"pending", "active", "on_hold", "paused", "cancelled", "failed", "expired", "past_due"}
)

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


# --- field readers -------------------------------------------------------------------------------


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{where} must be an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PayloadError(f"{where} must be a list")
    return value


def _str(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{where}.{key} must be a non-empty string")
    return value


def _optional_str(data: dict[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{where}.{key} must be a string or null")
    return value


def _bool(data: dict[str, Any], key: str, where: str, default: bool | None = None) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise PayloadError(f"{where}.{key} must be true or false")
    return value


def _optional_int(data: dict[str, Any], key: str, where: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{where}.{key} must be an integer")
    return value


def parse_time(value: Any, where: str) -> datetime:
    """An ISO 8601 timestamp; without an offset it is taken as UTC. Sub-microsecond digits are cut."""
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{where} must be an ISO 8601 timestamp")
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # Python reads at most 6 fractional digits
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise PayloadError(f"{where} must be an ISO 8601 timestamp, got {value!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _optional_time(data: dict[str, Any], key: str, where: str) -> datetime | None:
    value = data.get(key)
    return None if value is None else parse_time(value, f"{where}.{key}")


@dataclass(frozen=True)
class Amount:
    """A decimal from the provider, its atoms at the mirror precision, and how many places it used."""

    value: Decimal
    atoms: int
    places: int


def parse_amount(value: Any, where: str, *, allow_negative: bool = False) -> Amount:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PayloadError(f"{where} must be a decimal string")
    try:
        number = parse_decimal(value)
        atoms = to_atoms(number, MIRROR_PRECISION)
    except AmountError as error:
        raise PayloadError(f"{where}: {error}") from None
    if number < 0 and not allow_negative:
        raise PayloadError(f"{where} must not be negative")
    exponent = number.as_tuple().exponent
    places = max(0, -exponent) if isinstance(exponent, int) else 0
    return Amount(number, atoms, places)


def _optional_amount(data: dict[str, Any], key: str, where: str) -> Amount | None:
    value = data.get(key)
    return None if value is None else parse_amount(value, f"{where}.{key}")


# --- the envelope --------------------------------------------------------------------------------


def envelope(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The event type and its `data` object."""
    event_type = payload.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise PayloadError("the event needs a type")
    return event_type, _dict(payload.get("data"), "data")


# --- credit ledger entries -----------------------------------------------------------------------


def parse_ledger_entry(data: dict[str, Any]) -> ProviderEntry:
    """A `credit.*` ledger entry (every type except `credit.balance_low`)."""
    where = "data"
    transaction_type = _str(data, "transaction_type", where)
    kind = ENTRY_KINDS.get(transaction_type)
    if kind is None:
        raise PayloadError(f"unknown transaction_type {transaction_type!r}")
    amounts = {
        key: parse_amount(data.get(key), f"{where}.{key}")
        for key in ("amount", "balance_before", "balance_after", "overage_before", "overage_after")
    }
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise PayloadError("data.metadata must be an object")
    extra = {"metadata": metadata}
    for key in ("brand_id", "business_id"):
        if isinstance(data.get(key), str):
            extra[key] = data[key]
    return ProviderEntry(
        provider=PROVIDER,
        external_id=_str(data, "id", where),
        customer_id=_str(data, "customer_id", where),
        entitlement_id=_str(data, "credit_entitlement_id", where),
        kind=kind,
        transaction_type=transaction_type,
        is_credit=_bool(data, "is_credit", where),
        amount=amounts["amount"].atoms,
        balance_before=amounts["balance_before"].atoms,
        balance_after=amounts["balance_after"].atoms,
        overage_before=amounts["overage_before"].atoms,
        overage_after=amounts["overage_after"].atoms,
        created_at=parse_time(data.get("created_at"), "data.created_at"),
        description=_optional_str(data, "description", where),
        provider_grant_id=_optional_str(data, "grant_id", where),
        reference_type=_optional_str(data, "reference_type", where),
        reference_id=_optional_str(data, "reference_id", where),
        extra=extra,
        display_precision=max(amount.places for amount in amounts.values()),
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


def parse_balance_low(data: dict[str, Any]) -> BalanceLow:
    where = "data"
    available = data.get("available_balance")
    parse_amount(available, "data.available_balance", allow_negative=True)  # validated, kept as sent
    return BalanceLow(
        customer_id=_str(data, "customer_id", where),
        subscription_id=_optional_str(data, "subscription_id", where),
        entitlement_id=_str(data, "credit_entitlement_id", where),
        entitlement_name=_optional_str(data, "credit_entitlement_name", where),
        available_balance=str(available),
        subscription_credits_amount=_optional_str(data, "subscription_credits_amount", where),
        threshold_percent=_optional_int(data, "threshold_percent", where),
        threshold_amount=_optional_str(data, "threshold_amount", where),
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


def _cart_line(value: Any, where: str) -> CartLine:
    line = _dict(value, where)
    return CartLine(
        entitlement_id=_str(line, "credit_entitlement_id", where),
        name=_optional_str(line, "credit_entitlement_name", where) or _str(line, "credit_entitlement_id", where),
        unit=_optional_str(line, "unit", where) or "credits",
        product_id=_optional_str(line, "product_id", where),
        credits_amount=parse_amount(line.get("credits_amount", "0"), f"{where}.credits_amount"),
        overage_enabled=_bool(line, "overage_enabled", where),
        overage_limit=_optional_amount(line, "overage_limit", where),
        overage_behavior=_optional_str(line, "overage_behavior", where),
        rollover_enabled=_bool(line, "rollover_enabled", where, default=False),
        remaining_balance=_optional_amount(line, "remaining_balance", where),
        overage_balance=_optional_amount(line, "overage_balance", where),
    )


def _meter_line(value: Any, where: str) -> MeterLine:
    line = _dict(value, where)
    price = line.get("price_per_unit")
    if price is not None:
        parse_amount(price, f"{where}.price_per_unit")
    return MeterLine(
        meter_id=_str(line, "meter_id", where),
        name=_optional_str(line, "name", where) or _str(line, "meter_id", where),
        description=_optional_str(line, "description", where),
        currency=_optional_str(line, "currency", where),
        free_threshold=_optional_int(line, "free_threshold", where) or 0,
        measurement_unit=_optional_str(line, "measurement_unit", where),
        price_per_unit=None if price is None else str(price),
    )


def _meter_credit_line(value: Any, where: str) -> MeterCreditLine:
    line = _dict(value, where)
    rate = line.get("meter_units_per_credit")
    parse_amount(rate, f"{where}.meter_units_per_credit")
    return MeterCreditLine(
        meter_id=_str(line, "meter_id", where),
        entitlement_id=_str(line, "credit_entitlement_id", where),
        meter_name=_optional_str(line, "meter_name", where),
        meter_units_per_credit=str(rate),
    )


def parse_subscription(data: dict[str, Any]) -> DodoSubscription:
    where = "data"
    status = data.get("status")
    if status not in SUBSCRIPTION_STATUSES:
        raise PayloadError(f"unknown subscription status {status!r}")
    customer = _dict(data.get("customer"), "data.customer")
    quantity = _optional_int(data, "quantity", where)
    cancelled_at = _optional_time(data, "cancelled_at", where)
    ended = status in {"cancelled", "expired", "failed"}
    snapshot = SubscriptionSnapshot(
        id=_str(data, "subscription_id", where),
        provider=PROVIDER,
        customer_id=_str(customer, "customer_id", "data.customer"),
        status=status,
        product_id=_optional_str(data, "product_id", where),
        price_id=None,
        quantity=quantity if quantity is not None else 1,
        period_start=parse_time(data.get("previous_billing_date"), "data.previous_billing_date"),
        period_end=parse_time(data.get("next_billing_date"), "data.next_billing_date"),
        cancel_at_period_end=_bool(data, "cancel_at_next_billing_date", where, default=False),
        canceled_at=cancelled_at,
        ended_at=(cancelled_at or _optional_time(data, "expires_at", where)) if ended else None,
    )
    return DodoSubscription(
        snapshot=snapshot,
        customer_email=_optional_str(customer, "email", "data.customer"),
        customer_name=_optional_str(customer, "name", "data.customer"),
        cart=[
            _cart_line(line, f"data.credit_entitlement_cart[{index}]")
            for index, line in enumerate(_list(data.get("credit_entitlement_cart"), "data.credit_entitlement_cart"))
        ],
        meters=[
            _meter_line(line, f"data.meters[{index}]")
            for index, line in enumerate(_list(data.get("meters"), "data.meters"))
        ],
        meter_credits=[
            _meter_credit_line(line, f"data.meter_credit_entitlement_cart[{index}]")
            for index, line in enumerate(
                _list(data.get("meter_credit_entitlement_cart"), "data.meter_credit_entitlement_cart")
            )
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


def parse_payment_or_refund(kind: str, data: dict[str, Any]) -> PaymentState:
    where = "data"
    customer = data.get("customer")
    customer_id = customer.get("customer_id") if isinstance(customer, dict) else None
    if kind == "refund":
        object_id, payment_id = _str(data, "refund_id", where), _optional_str(data, "payment_id", where)
        amount = _optional_int(data, "amount", where)
    else:
        object_id, payment_id = _str(data, "payment_id", where), None
        amount = _optional_int(data, "total_amount", where)
    return PaymentState(
        kind=kind,
        object_id=object_id,
        payment_id=payment_id,
        customer_id=customer_id if isinstance(customer_id, str) else None,
        subscription_id=_optional_str(data, "subscription_id", where),
        status=_optional_str(data, "status", where),
        amount=amount,
        currency=_optional_str(data, "currency", where),
        created_at=_optional_time(data, "created_at", where),
    )
