"""Provider payloads are validated at the handler's edge: whatever an authenticated event carries, reading
it either gives Tally's plain values or raises PayloadError (dead-lettered at once), never another error
that would be retried for minutes.

The parse tests need no database; the last test applies malformed events through the worker's path.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import pytest
from builders import event, invoice_paid, subscription_object
from dodo_builders import envelope, ledger_entry
from dodo_builders import subscription as dodo_subscription
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from app.config import get_settings
from app.errors import PayloadError
from app.inbox.processing import apply_event
from app.inbox.store import store_event
from app.models import InboxEvent
from app.providers.dodo import objects as dodo
from app.providers.stripe import objects as stripe

START, END = 1_767_225_600, 1_769_904_000  # 2026-01-01, 2026-02-01


# --- valid payloads, as the providers send them ---------------------------------------------------


def stripe_subscription_events() -> list[dict[str, Any]]:
    current = subscription_object("sub_1", "cus_1", "active", START, END)
    item = current["items"]["data"][0]
    item["quantity"] = 3
    item["price"]["product"] = {"id": "prod_1", "object": "product", "metadata": {"included": "100"}}
    item["price"]["metadata"] = {"plan": "pro"}
    previous = {
        "status": "incomplete",
        "cancel_at_period_end": True,
        "canceled_at": None,
        "items": {
            "data": [{"price": {"id": "price_old"}, "current_period_start": START - 10, "current_period_end": END - 10}]
        },
    }
    legacy = subscription_object(
        "sub_2",
        {"id": "cus_2", "object": "customer"},
        "canceled",
        START,
        END,  # type: ignore[arg-type]
        canceled_at=START + 5,
        api="2024-06-20",
    )
    legacy["items"]["data"][0]["price"] = "price_123"
    return [
        event("evt_s1", "customer.subscription.updated", current, created=START + 1, previous_attributes=previous),
        event("evt_s2", "customer.subscription.deleted", legacy, created=START + 6),
    ]


def stripe_invoice_events() -> list[dict[str, Any]]:
    one_off = invoice_paid("evt_i3", "sub_1", "cus_1", START, END)
    del one_off["data"]["object"]["parent"]
    return [
        invoice_paid("evt_i1", "sub_1", "cus_1", START, END),
        invoice_paid("evt_i2", "sub_1", "cus_1", START, END, api="2024-06-20"),
        one_off,
    ]


def stripe_customer_events() -> list[dict[str, Any]]:
    customer = {"id": "cus_1", "object": "customer", "email": "a@example.com", "name": "Ada", "deleted": False}
    return [
        event("evt_c1", "customer.updated", customer, created=START, previous_attributes={"email": None}),
        event("evt_c2", "customer.deleted", {"id": "cus_1", "object": "customer", "deleted": True}),
    ]


STRIPE_THIN = {
    "object": "v2.core.event",
    "id": "evt_t1",
    "type": "v1.billing.meter.no_meter_found",
    "created": "2026-01-01T00:00:00.000Z",
    "related_object": {"id": "mtr_1", "type": "billing.meter"},
}


def dodo_ledger_events() -> list[dict[str, Any]]:
    deducted = ledger_entry(
        "cle_1",
        "cus_1",
        "cde_1",
        "credit_deducted",
        "12.50",
        ("250.00", "0"),
        ("237.50", "0"),
        "2026-01-15T10:30:00.123456789Z",
        grant_id="cdg_1",
    )
    deducted["data"].update(
        description="usage", reference_type="meter", reference_id="mtr_1", metadata={"source": "api"}
    )
    charged = ledger_entry(
        "cle_2", "cus_1", "cde_1", "overage_charged", "5", ("0", "0"), ("0", "5"), "2026-01-15T10:31:00"
    )
    charged["data"].update(amount=5, overage_after=5)  # JSON integers are amounts too
    return [deducted, charged]


def dodo_balance_low_events() -> list[dict[str, Any]]:
    return [
        envelope(
            "credit.balance_low",
            {
                "customer_id": "cus_1",
                "subscription_id": "sub_1",
                "credit_entitlement_id": "cde_1",
                "credit_entitlement_name": "API Calls",
                "available_balance": "-12.50",
                "subscription_credits_amount": "1000",
                "threshold_percent": 20,
                "threshold_amount": "200",
            },
        )
    ]


def dodo_subscription_events() -> list[dict[str, Any]]:
    cancelled = dodo_subscription("sub_2", "cus_2", "cancelled", cancelled_at="2026-01-20T00:00:00+02:00")
    cancelled["data"]["credit_entitlement_cart"] = None
    return [dodo_subscription("sub_1", "cus_1"), cancelled]


PAYMENT = {
    "payment_id": "pay_1",
    "status": "succeeded",
    "total_amount": 1999,
    "currency": "USD",
    "customer": {"customer_id": "cus_1", "email": "a@b.c", "name": "A"},
    "subscription_id": "sub_1",
    "created_at": "2026-01-01T00:00:00Z",
}
REFUND = {
    "refund_id": "ref_1",
    "payment_id": "pay_1",
    "status": "succeeded",
    "amount": 500,
    "currency": "USD",
    "customer": {"customer_id": "cus_1"},
    "created_at": "2026-01-02T00:00:00Z",
    "is_partial": True,
}

PARSERS: dict[str, tuple[Callable[[Any], object], list[dict[str, Any]]]] = {
    "stripe.event_type": (stripe.event_type, [*stripe_subscription_events(), *stripe_invoice_events(), STRIPE_THIN]),
    "stripe.parse_subscription_event": (stripe.parse_subscription_event, stripe_subscription_events()),
    "stripe.parse_paid_invoice": (stripe.parse_paid_invoice, stripe_invoice_events()),
    "stripe.parse_customer_event": (stripe.parse_customer_event, stripe_customer_events()),
    "dodo.event_type": (dodo.event_type, [*dodo_ledger_events(), envelope("license_key.created", {"id": "lic_1"})]),
    "dodo.parse_ledger_entry": (dodo.parse_ledger_entry, dodo_ledger_events()),
    "dodo.parse_balance_low": (dodo.parse_balance_low, dodo_balance_low_events()),
    "dodo.parse_subscription": (dodo.parse_subscription, dodo_subscription_events()),
    "dodo.parse_payment_or_refund(payment)": (
        partial(dodo.parse_payment_or_refund, "payment"),
        [envelope("payment.succeeded", PAYMENT)],
    ),
    "dodo.parse_payment_or_refund(refund)": (
        partial(dodo.parse_payment_or_refund, "refund"),
        [envelope("refund.succeeded", REFUND)],
    ),
}


# --- arbitrary JSON anywhere ----------------------------------------------------------------------


def _keys(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield key
            yield from _keys(child)
    elif isinstance(value, list):
        for child in value:
            yield from _keys(child)


KEYS = sorted({key for _, payloads in PARSERS.values() for payload in payloads for key in _keys(payload)})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 2**64, 2**70, -(2**70), 10**30, 253_402_300_800]),
    st.sampled_from(
        [
            "",
            "0",
            "-5",
            "12.50",
            "1E+999999",
            "1E-999999",
            "0.00000000001",
            "NaN",
            "-Infinity",
            "1_000",
            "0.00000000010000000000000000000000000001",
            "2026-01-01T00:00:00Z",
            "2026-01-01",
            "9999-12-31T23:59:59-05:00",
            "0001-01-01T00:00:00+01:00",
            "not a date",
            "active",
            "subscription",
            "subscription_item_details",
            "credit_added",
            "v2.core.event",
            "price_123",
            "cus_1",
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
DELETE = object()


def _positions(value: object, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _positions(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _positions(child, (*path, index))


def _put(payload: Any, path: tuple[str | int, ...], value: object) -> Any:
    """A copy of `payload` with `value` at `path` (the key removed for DELETE)."""
    if not path:
        return None if value is DELETE else value
    result = copy.deepcopy(payload)
    parent = _get(result, path[:-1])
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return result


@st.composite
def mutated(draw: st.DrawFn, payloads: list[dict[str, Any]]) -> Any:
    """A valid payload with one to three positions given arbitrary JSON, removed, or given a new key."""
    payload: Any = draw(st.sampled_from(payloads))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_positions(payload))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "add" and isinstance(_get(payload, path), dict):
            key = draw(st.sampled_from(KEYS) | st.text(max_size=6))
            payload = _put(payload, (*path, key), draw(json_values))
        elif action == "delete" and path and isinstance(_get(payload, path[:-1]), dict):
            payload = _put(payload, path, DELETE)
        else:
            payload = _put(payload, path, draw(json_values))
    return payload


def _get(payload: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        payload = payload[step]
    return payload


def _check_storable(value: object, where: str = "result") -> None:
    """Typed values fit the columns that store them: 64-bit integers, aware UTC instants.

    Free-form JSON (metadata, `extra`) is not walked: it is stored as the provider sent it."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, Decimal)):
        return
    if isinstance(value, int):
        assert -(2**63) <= value < 2**63, f"{where} = {value} does not fit 64 bits"
    elif isinstance(value, datetime):
        assert value.utcoffset() == timedelta(0), f"{where} is not in UTC"
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            if field.name not in ("metadata", "extra"):
                _check_storable(getattr(value, field.name), f"{where}.{field.name}")
    elif isinstance(value, (tuple, list)):
        names = getattr(value, "_fields", range(len(value)))
        for name, child in zip(names, value, strict=True):
            _check_storable(child, f"{where}.{name}")
    elif not isinstance(value, dict):
        raise AssertionError(f"{where} is an unexpected {type(value).__name__}")


@pytest.mark.parametrize("name", PARSERS)
def test_the_valid_payloads_parse(name):
    parse, payloads = PARSERS[name]
    for payload in payloads:
        _check_storable(parse(copy.deepcopy(payload)))


@pytest.mark.parametrize("name", PARSERS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_json_anywhere_parses_or_is_a_payload_error(name, data):
    parse, payloads = PARSERS[name]
    payload = data.draw(mutated(payloads), label="payload")
    try:
        result = parse(payload)
    except PayloadError as error:
        assert error.message
        return
    _check_storable(result)


# --- direct cases ---------------------------------------------------------------------------------


def _error(parse: Callable[[Any], object], payload: Any) -> str:
    with pytest.raises(PayloadError) as caught:
        parse(payload)
    return caught.value.message


def _stripe_subscription(**changes: Any) -> dict[str, Any]:
    payload = event(
        "evt_1",
        "customer.subscription.updated",
        subscription_object("sub_1", "cus_1", "active", START, END),
        created=START,
    )
    for path, value in changes.items():
        payload = _put(payload, tuple(int(step) if step.isdigit() else step for step in path.split("__")), value)
    return payload


def test_a_date_that_overflows_once_its_offset_is_applied_is_refused():
    payload = dodo_ledger_events()[0]
    payload["data"]["created_at"] = "9999-12-31T23:59:59-05:00"
    assert _error(dodo.parse_ledger_entry, payload) == (
        "data.created_at: '9999-12-31T23:59:59-05:00' is outside the supported range of dates"
    )
    payload = dodo_subscription_events()[0]
    payload["data"]["previous_billing_date"] = "0001-01-01T00:00:00+01:00"
    assert _error(dodo.parse_subscription, payload).startswith("data.previous_billing_date: ")


def test_a_list_where_a_mapping_is_expected_is_named_by_its_path():
    payload = _stripe_subscription(data__object__items__data__0__price=["price_123"])
    assert _error(stripe.parse_subscription_event, payload) == "data.object.items.data[0].price: must be an object"
    payload = dodo_subscription_events()[0]
    payload["data"]["customer"] = [{"customer_id": "cus_1"}]
    assert _error(dodo.parse_subscription, payload) == "data.customer: must be an object"
    assert _error(dodo.event_type, envelope("credit.added", [])) == "data: must be an object"


def test_a_timestamp_beyond_any_date_is_refused():
    assert _error(stripe.parse_subscription_event, _stripe_subscription(created=2**70)) == (
        f"created: {2**70} is outside the supported range of dates"
    )
    payload = _stripe_subscription(data__object__items__data__0__current_period_end=2**70)
    assert _error(stripe.parse_subscription_event, payload).startswith("data.object.items.data[0].current_period_end: ")
    invoice = invoice_paid("evt_i", "sub_1", "cus_1", START, -(2**70))
    assert _error(stripe.parse_paid_invoice, invoice).startswith("data.object.lines.data[0].period.end: ")


def test_values_that_used_to_fail_deeper_down_are_payload_errors():
    cases: list[tuple[Callable[[Any], object], Any, str]] = [
        (
            stripe.parse_subscription_event,
            _stripe_subscription(data__object__status=["active"]),
            "data.object.status: must be a string",
        ),
        (
            stripe.parse_subscription_event,
            _stripe_subscription(data__object__items__data__0__quantity=2**40),
            "data.object.items.data[0].quantity: must be at most 2147483647",
        ),
        (
            stripe.parse_subscription_event,
            _stripe_subscription(data__object__items="items"),
            "data.object.items: must be an object",
        ),
        (
            stripe.parse_subscription_event,
            _stripe_subscription(data__previous_attributes={"items": {"data": {"0": {}}}}),
            "data.previous_attributes.items.data: must be a list",
        ),
        (stripe.event_type, _stripe_subscription(type=["customer.subscription.updated"]), "type: must be a string"),
        (
            dodo.parse_ledger_entry,
            _put(dodo_ledger_events()[0], ("data", "amount"), "1E+999999"),
            "data.amount: amount 1E+999999 is too large",
        ),
        (
            dodo.parse_ledger_entry,
            _put(dodo_ledger_events()[0], ("data", "amount"), 12.5),
            "data.amount: must be a decimal string",
        ),
        (
            partial(dodo.parse_payment_or_refund, "payment"),
            envelope("payment.succeeded", {**PAYMENT, "total_amount": 2**64}),
            "data.total_amount: must be at most 9223372036854775807",
        ),
        (
            dodo.parse_subscription,
            _put(dodo_subscription_events()[0], ("data", "cancel_at_next_billing_date"), "no"),
            "data.cancel_at_next_billing_date: must be true or false",
        ),
    ]
    for parse, payload, message in cases:
        assert _error(parse, payload) == message


def test_amounts_stay_exact():
    beyond = _put(dodo_ledger_events()[0], ("data", "amount"), "0.00000000010000000000000000000000000001")
    assert "more than 10 decimal places" in _error(dodo.parse_ledger_entry, beyond)  # was rounded to 1 atom
    tiny = _put(dodo_ledger_events()[0], ("data", "amount"), "1E-9999999999")
    assert "more than 10 decimal places" in _error(dodo.parse_ledger_entry, tiny)  # was 0 atoms
    entry = dodo.parse_ledger_entry(_put(dodo_ledger_events()[0], ("data", "balance_after"), "237.5000000000000000"))
    assert (entry.amount, entry.balance_after, entry.display_precision) == (125_000_000_000, 2_375_000_000_000, 10)


def test_every_problem_is_reported_with_its_path():
    payload = dodo_ledger_events()[0]
    del payload["data"]["balance_after"]
    payload["data"]["is_credit"] = "false"
    assert _error(dodo.parse_ledger_entry, payload) == (
        "data.is_credit: must be true or false; data.balance_after: is required"
    )


def test_strict_where_the_readers_were_strict():
    assert _error(stripe.parse_subscription_event, _stripe_subscription(data__object__status="exploded")) == (
        "data.object.status: unknown subscription status 'exploded'"
    )
    payload = _put(dodo_ledger_events()[0], ("data", "transaction_type"), "credit_gifted")
    assert _error(dodo.parse_ledger_entry, payload) == "data.transaction_type: unknown transaction_type 'credit_gifted'"
    payload = _put(dodo_ledger_events()[0], ("data", "balance_after"), "-1")
    assert _error(dodo.parse_ledger_entry, payload) == "data.balance_after: must not be negative"


def test_lenient_where_stripe_leaves_things_out():
    bare = _stripe_subscription(data__object__items=None)
    parsed = stripe.parse_subscription_event(bare)
    assert (parsed.snapshot.price_id, parsed.snapshot.quantity, parsed.snapshot.period_start) == (None, 1, None)
    assert (
        stripe.parse_subscription_event(
            _stripe_subscription(data__object__items__data__0__quantity="3")
        ).snapshot.quantity
        == 1
    )
    by_id = stripe.parse_subscription_event(_stripe_subscription(data__object__items__data__0__price="price_9"))
    assert by_id.price == stripe.PriceRef("price_9", None, None, {})
    current = stripe.parse_subscription_event(stripe_subscription_events()[0])
    assert current.price == stripe.PriceRef("price_123", "prod_1", None, {"included": "100", "plan": "pro"})
    assert (current.snapshot.quantity, current.snapshot.period_end) == (3, datetime.fromtimestamp(END, UTC))
    assert current.info == stripe.EventInfo(
        "evt_s1",
        "customer.subscription.updated",
        START + 1,
        {
            "status": "incomplete",
            "cancel_at_period_end": True,
            "canceled_at": None,
            "current_period_start": START - 10,
            "current_period_end": END - 10,
            "price_id": "price_old",
        },
    )
    legacy = stripe.parse_subscription_event(stripe_subscription_events()[1])
    assert (legacy.snapshot.customer_id, legacy.snapshot.canceled_at) == (
        "cus_2",
        datetime.fromtimestamp(START + 5, UTC),
    )
    assert stripe.parse_paid_invoice(stripe_invoice_events()[2]) is None  # a one-off invoice
    assert stripe.event_type(STRIPE_THIN) is None


# --- through the worker ---------------------------------------------------------------------------


MALFORMED = [
    ("stripe", _stripe_subscription(created=2**70)),
    ("stripe", _stripe_subscription(data__object__items__data__0__price=["price_123"])),
    ("stripe", _stripe_subscription(data__object__status=["active"])),
    ("stripe", _stripe_subscription(data__object__items__data__0__quantity=2**40)),
    ("stripe", _put(invoice_paid("evt_1", "sub_1", "cus_1", START, END), ("data", "object", "parent"), "sub_1")),
    ("stripe", _put(stripe_customer_events()[0], ("data", "object", "email"), {"address": "a@example.com"})),
    ("dodo", _put(dodo_ledger_events()[0], ("data", "created_at"), "9999-12-31T23:59:59-05:00")),
    ("dodo", _put(dodo_ledger_events()[0], ("data", "amount"), "1E+999999")),
    ("dodo", _put(dodo_subscription_events()[0], ("data", "meters"), {"mtr_1": {}})),
    ("dodo", envelope("payment.succeeded", {**PAYMENT, "total_amount": 2**64})),
]


@pytest.mark.parametrize(("provider", "payload"), MALFORMED)
def test_a_malformed_event_is_dead_lettered_at_the_first_attempt(db, provider, payload):
    inbox_id = store_event(
        db,
        provider=provider,
        event_id=f"evt_{time.monotonic_ns()}",
        event_type=payload["type"],
        body=json.dumps(payload),
    )
    assert inbox_id is not None
    assert apply_event(db, get_settings().catalogue, inbox_id, max_attempts=8) == "failed"
    with db.read() as session:
        stored = session.execute(select(InboxEvent).where(InboxEvent.id == inbox_id)).scalar_one()
        assert stored.attempts == 1
        assert (stored.last_error or "").startswith("malformed payload: ")
