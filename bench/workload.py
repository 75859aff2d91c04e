"""What the bench feeds Tally: its plan catalogue, signed Stripe events and usage events.

Everything here is built from Tally's public formats only (SPEC 5.2 catalogue, Stripe's event JSON,
the `/events/ingest` body), so it keeps working while the app's internals change.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path

STRIPE_SECRET = "whsec_tally_bench_secret_0123456789"
DAY = 86_400

# Entitlements, plans and the meter. Amounts are integers (precision 0) so that every check is exact.
USAGE_ENTITLEMENT = "bench_credits"  # P2 and P4 usage events deduct from it
STRIPE_ENTITLEMENT = "bench_stripe"  # P1/P2b subscriptions are granted it
DEBIT_ENTITLEMENT = "bench_debit"  # P5: overage disabled, so a balance can run out
USAGE_EVENT = "bench_call"
USAGE_KEY = "units"

PRICE_USAGE = "price_bench_usage"  # 10^9 credits a period: never runs out
PRICE_USAGE_SMALL = "price_bench_usage_small"  # 100 credits, hard cap 100: some events are refused
PRICE_STRIPE = "price_bench_stripe"  # the P1/P2b webhook mix
PRICE_DEBIT_LARGE = "price_bench_debit_large"  # P5 throughput: never runs out
PRICE_DEBIT_SMALL = "price_bench_debit_small"  # P5 overshoot check: runs out

USAGE_SMALL_INCLUDED = 100
DEBIT_SMALL_INCLUDED = 1000
DEBIT_AMOUNT_SMALL = 3  # 1000 = 333 x 3 + 1: the 334th debit must be refused whole
LARGE = 10**9

CATALOGUE = f"""\
# Written by bench/run.py for one run; see bench/workload.py.

[entitlements.{USAGE_ENTITLEMENT}]
name = "Bench usage credits"
unit = "credit"
precision = 0
overage_enabled = true

[entitlements.{STRIPE_ENTITLEMENT}]
name = "Bench Stripe plan credits"
unit = "credit"
precision = 0
overage_enabled = true

[entitlements.{DEBIT_ENTITLEMENT}]
name = "Bench debit credits"
unit = "credit"
precision = 0
overage_enabled = false

[plans.bench_usage]
stripe_price = "{PRICE_USAGE}"
entitlement = "{USAGE_ENTITLEMENT}"
unit = "credit"
included = {LARGE}
hard_cap = "unlimited"

[plans.bench_usage_small]
stripe_price = "{PRICE_USAGE_SMALL}"
entitlement = "{USAGE_ENTITLEMENT}"
unit = "credit"
included = {USAGE_SMALL_INCLUDED}
hard_cap = {USAGE_SMALL_INCLUDED}

[plans.bench_stripe]
stripe_price = "{PRICE_STRIPE}"
entitlement = "{STRIPE_ENTITLEMENT}"
unit = "credit"
included = 1000
hard_cap = "unlimited"

[plans.bench_debit_large]
stripe_price = "{PRICE_DEBIT_LARGE}"
entitlement = "{DEBIT_ENTITLEMENT}"
unit = "credit"
included = {LARGE}
hard_cap = {LARGE}

[plans.bench_debit_small]
stripe_price = "{PRICE_DEBIT_SMALL}"
entitlement = "{DEBIT_ENTITLEMENT}"
unit = "credit"
included = {DEBIT_SMALL_INCLUDED}
hard_cap = {DEBIT_SMALL_INCLUDED}

[meters.bench_units]
event_name = "{USAGE_EVENT}"
aggregation = "sum"
key = "{USAGE_KEY}"
entitlement = "{USAGE_ENTITLEMENT}"
units_per_credit = 1
"""


def write_catalogue(directory: Path) -> Path:
    path = directory / "plans.toml"
    path.write_text(CATALOGUE)
    return path


# --- Stripe --------------------------------------------------------------------------------------


def sign(body: str, timestamp: int, secret: str = STRIPE_SECRET) -> str:
    """`Stripe-Signature` as Stripe computes it: HMAC-SHA256 over "{t}.{body}" keyed by the secret."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _event(event_id: str, event_type: str, obj: dict, created: int, previous: dict | None = None) -> dict:
    data: dict = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "type": event_type,
        "created": created,
        "livemode": False,
        "pending_webhooks": 1,
        "data": data,
    }


def subscription(
    sub_id: str, customer: str, price: str, start: int, end: int, *, cancel_at_period_end: bool = False
) -> dict:
    """A subscription as API 2025-03-31 renders it (the period on the item)."""
    item = {
        "id": f"si_{sub_id}",
        "object": "subscription_item",
        "quantity": 1,
        "current_period_start": start,
        "current_period_end": end,
        "price": {"id": price, "object": "price", "product": f"prod_{price}", "lookup_key": None, "metadata": {}},
    }
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": "active",
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": None,
        "ended_at": None,
        "items": {"object": "list", "data": [item]},
    }


def invoice_paid(event_id: str, sub_id: str, customer: str, price: str, start: int, end: int, created: int) -> dict:
    line = {
        "id": f"il_{event_id}",
        "object": "line_item",
        "period": {"start": start, "end": end},
        "parent": {
            "type": "subscription_item_details",
            "subscription_item_details": {"subscription": sub_id, "proration": False},
        },
        "pricing": {"type": "price_details", "price_details": {"price": price, "product": f"prod_{price}"}},
    }
    invoice = {
        "id": f"in_{event_id}",
        "object": "invoice",
        "customer": customer,
        "status": "paid",
        "billing_reason": "subscription_cycle",
        "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub_id}},
        "lines": {"object": "list", "data": [line]},
    }
    return _event(event_id, "invoice.paid", invoice, created)


def subscription_created(prefix: str, customer: str, price: str, now: int) -> dict:
    """The webhook that makes a customer and grants its first period, as an operator's would."""
    sub_id = f"sub_{customer}"
    return _event(
        f"evt_{prefix}_{customer}",
        "customer.subscription.created",
        subscription(sub_id, customer, price, now - DAY, now + 29 * DAY),
        now - 60,
    )


EVENTS_PER_SUBSCRIPTION = 6
MIX = (
    "customer.subscription.created",
    "invoice.paid (same period)",
    "customer.subscription.updated (cancel)",
    "customer.subscription.updated (uncancel)",
    "invoice.paid (renewal)",
    "customer.subscription.updated (renewal)",
)


def subscription_lifecycle(prefix: str, n: int, now: int) -> list[dict]:
    """The P1/P2b mix: six events of one subscription, as Stripe sends them around a renewal.

    created (grants period 1), invoice.paid for period 1 (a no-op: granted already), updated with
    cancel_at_period_end true then false (snapshots with previous_attributes), invoice.paid for period
    2 (grants it; period 1's remainder expires) and updated into period 2. `created` increases along
    the sequence so that the watermarks order them whatever the order of application.
    """
    customer, sub_id = f"cus_{prefix}_{n}", f"sub_{prefix}_{n}"
    p1, p2, p3 = now - DAY, now + 29 * DAY, now + 59 * DAY
    t = now - 120

    def sub(start: int, end: int, cancel: bool = False) -> dict:
        return subscription(sub_id, customer, PRICE_STRIPE, start, end, cancel_at_period_end=cancel)

    return [
        _event(f"evt_{prefix}_{n}_0", "customer.subscription.created", sub(p1, p2), t),
        invoice_paid(f"evt_{prefix}_{n}_1", sub_id, customer, PRICE_STRIPE, p1, p2, t + 1),
        _event(
            f"evt_{prefix}_{n}_2",
            "customer.subscription.updated",
            sub(p1, p2, True),
            t + 2,
            {"cancel_at_period_end": False},
        ),
        _event(
            f"evt_{prefix}_{n}_3",
            "customer.subscription.updated",
            sub(p1, p2, False),
            t + 3,
            {"cancel_at_period_end": True},
        ),
        invoice_paid(f"evt_{prefix}_{n}_4", sub_id, customer, PRICE_STRIPE, p2, p3, t + 4),
        _event(
            f"evt_{prefix}_{n}_5",
            "customer.subscription.updated",
            sub(p2, p3),
            t + 5,
            {"items": {"data": [{"current_period_start": p1, "current_period_end": p2}]}},
        ),
    ]


@dataclass
class SignedEvents:
    path: Path  # one "signature<TAB>body" line per event, for the wrk script
    count: int
    prefix: str
    signed_at: int


def write_signed_lifecycles(path: Path, prefix: str, count: int) -> SignedEvents:
    """At least `count` distinct signed events (whole lifecycles), signed now: sign right before use."""
    now = int(time.time())
    written = 0
    with path.open("w") as out:
        n = 0
        while written < count:
            for event in subscription_lifecycle(prefix, n, now):
                body = json.dumps(event, separators=(",", ":"))
                out.write(f"{sign(body, now)}\t{body}\n")
                written += 1
            n += 1
    return SignedEvents(path, written, prefix, now)


def signed_request(payload: dict, now: int | None = None) -> tuple[str, dict[str, str]]:
    body = json.dumps(payload, separators=(",", ":"))
    return body, {"Stripe-Signature": sign(body, now or int(time.time())), "Content-Type": "application/json"}


# --- usage events ----------------------------------------------------------------------------------


def usage_value(n: int) -> int:
    """The metered value of the n-th P2 event: 1..5 units (= credits)."""
    return n % 5 + 1


def ingest_batches(prefix: str, customers: list[str], events: int, batch: int) -> list[tuple[str, list[dict]]]:
    """`events` usage events in batches of `batch`, each batch one customer's (round robin).

    Returns (customer, events) pairs; the timestamp is left out, so Tally stamps them on arrival.
    """
    batches = []
    for b, start in enumerate(range(0, events, batch)):
        customer = customers[b % len(customers)]
        batches.append(
            (
                customer,
                [
                    {
                        "event_id": f"{prefix}-{n}",
                        "customer_id": customer,
                        "event_name": USAGE_EVENT,
                        "metadata": {USAGE_KEY: usage_value(n)},
                    }
                    for n in range(start, min(start + batch, events))
                ],
            )
        )
    return batches
