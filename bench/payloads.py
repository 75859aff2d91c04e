"""Payload validation benchmark (not a test): microseconds to read one provider event, as a worker does.

Validation runs once per applied event on the workers' hot path, so its cost is measured on its own:
representative payloads (a Stripe subscription event with its items and previous attributes, a Stripe
`invoice.paid`, a Dodo `credit.deducted` ledger entry, a Dodo subscription with a cart and meters),
each read the way its handler reads it (the envelope for dispatch, then the whole event), timed with
`timeit`. No database or broker is needed.

    .venv/bin/python bench/payloads.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START, END = 1_767_225_600, 1_769_904_000  # 2026-01-01, 2026-02-01


def _price() -> dict[str, Any]:
    return {
        "id": "price_1QxYz",
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "created": START - 86400,
        "currency": "eur",
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": "pro_monthly",
        "metadata": {"plan": "pro"},
        "nickname": None,
        "product": "prod_Rq1",
        "recurring": {"interval": "month", "interval_count": 1, "meter": None, "usage_type": "licensed"},
        "tax_behavior": "unspecified",
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "recurring",
        "unit_amount": 2900,
        "unit_amount_decimal": "2900",
    }


def stripe_subscription_event() -> dict[str, Any]:
    """`customer.subscription.updated` as API 2025-03-31 renders it (the period on the item)."""
    item = {
        "id": "si_Rq1",
        "object": "subscription_item",
        "created": START,
        "current_period_start": START,
        "current_period_end": END,
        "discounts": [],
        "metadata": {},
        "price": _price(),
        "quantity": 1,
        "subscription": "sub_1Qx",
        "tax_rates": [],
    }
    subscription: dict[str, Any] = {
        "id": "sub_1Qx",
        "object": "subscription",
        "application": None,
        "automatic_tax": {"enabled": False},
        "billing_cycle_anchor": START,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": "charge_automatically",
        "created": START,
        "currency": "eur",
        "customer": "cus_Rq1",
        "days_until_due": None,
        "default_payment_method": "pm_1",
        "description": None,
        "discounts": [],
        "ended_at": None,
        "invoice_settings": {"issuer": {"type": "self"}},
        "items": {"object": "list", "data": [item], "has_more": False, "url": "/v1/subscription_items"},
        "latest_invoice": "in_1Qx",
        "livemode": False,
        "metadata": {},
        "pending_update": None,
        "schedule": None,
        "start_date": START,
        "status": "active",
        "trial_end": None,
        "trial_start": None,
    }
    return {
        "id": "evt_1Qx",
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": START + 5,
        "data": {"object": subscription, "previous_attributes": {"status": "incomplete"}},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "customer.subscription.updated",
    }


def stripe_invoice_paid() -> dict[str, Any]:
    line = {
        "id": "il_1Qx",
        "object": "line_item",
        "amount": 2900,
        "currency": "eur",
        "description": "1 × Pro",
        "discountable": True,
        "discounts": [],
        "invoice": "in_1Qx",
        "livemode": False,
        "metadata": {},
        "parent": {
            "type": "subscription_item_details",
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "subscription": "sub_1Qx",
                "subscription_item": "si_Rq1",
            },
        },
        "period": {"start": START, "end": END},
        "pricing": {
            "type": "price_details",
            "unit_amount_decimal": "2900",
            "price_details": {"price": "price_1QxYz", "product": "prod_Rq1"},
        },
        "quantity": 1,
    }
    invoice = {
        "id": "in_1Qx",
        "object": "invoice",
        "account_country": "DE",
        "amount_due": 2900,
        "amount_paid": 2900,
        "amount_remaining": 0,
        "attempt_count": 1,
        "attempted": True,
        "billing_reason": "subscription_cycle",
        "collection_method": "charge_automatically",
        "created": START,
        "currency": "eur",
        "customer": "cus_Rq1",
        "customer_email": "a@example.com",
        "lines": {"object": "list", "data": [line], "has_more": False, "url": "/v1/invoices/in_1Qx/lines"},
        "livemode": False,
        "metadata": {},
        "number": "ABC-0001",
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": "sub_1Qx"},
        },
        "period_end": START,
        "period_start": START,
        "status": "paid",
        "subtotal": 2900,
        "total": 2900,
    }
    return {
        "id": "evt_2Qx",
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": START + 60,
        "data": {"object": invoice},
        "livemode": False,
        "pending_webhooks": 1,
        "type": "invoice.paid",
    }


def dodo_credit_deducted() -> dict[str, Any]:
    return {
        "business_id": "bus_1",
        "type": "credit.deducted",
        "timestamp": "2026-01-15T10:30:00.123456Z",
        "data": {
            "payload_type": "CreditLedgerEntry",
            "id": "cle_1",
            "customer_id": "cus_1",
            "credit_entitlement_id": "cde_1",
            "grant_id": "cdg_1",
            "transaction_type": "credit_deducted",
            "amount": "12.50",
            "is_credit": False,
            "balance_before": "250.00",
            "balance_after": "237.50",
            "overage_before": "0",
            "overage_after": "0",
            "description": "usage",
            "reference_type": "meter",
            "reference_id": "mtr_1",
            "metadata": {"source": "api"},
            "brand_id": "bra_1",
            "business_id": "bus_1",
            "created_at": "2026-01-15T10:30:00.123456789Z",
        },
    }


def dodo_subscription() -> dict[str, Any]:
    def cart_line(entitlement: str) -> dict[str, Any]:
        return {
            "credit_entitlement_id": entitlement,
            "credit_entitlement_name": "API Calls",
            "unit": "calls",
            "credits_amount": "1000.00",
            "overage_enabled": True,
            "overage_limit": "100.00",
            "overage_behavior": "invoice_at_billing",
            "rollover_enabled": False,
            "product_id": "pdt_1",
            "remaining_balance": "640.25",
            "overage_balance": "0",
            "expires_after_days": None,
            "low_balance_threshold_percent": 20,
            "max_rollover_count": None,
            "rollover_percentage": None,
            "rollover_timeframe_count": None,
            "rollover_timeframe_interval": None,
        }

    def meter(meter_id: str) -> dict[str, Any]:
        return {
            "meter_id": meter_id,
            "name": "API calls",
            "currency": "USD",
            "free_threshold": 100,
            "measurement_unit": "call",
            "price_per_unit": "0.01",
            "description": None,
        }

    data = {
        "payload_type": "Subscription",
        "subscription_id": "sub_1",
        "status": "active",
        "product_id": "pdt_1",
        "quantity": 1,
        "customer": {"customer_id": "cus_1", "email": "a@example.com", "name": "Ada"},
        "previous_billing_date": "2026-01-01T00:00:00Z",
        "next_billing_date": "2026-02-01T00:00:00Z",
        "cancel_at_next_billing_date": False,
        "cancelled_at": None,
        "meters": [meter("mtr_calls"), meter("mtr_tokens")],
        "credit_entitlement_cart": [cart_line("cde_calls"), cart_line("cde_tokens")],
        "meter_credit_entitlement_cart": [
            {
                "credit_entitlement_id": "cde_calls",
                "meter_id": "mtr_calls",
                "meter_name": "API calls",
                "meter_units_per_credit": "1",
                "product_id": "pdt_1",
            },
            {
                "credit_entitlement_id": "cde_tokens",
                "meter_id": "mtr_tokens",
                "meter_name": "Tokens",
                "meter_units_per_credit": "1000",
                "product_id": "pdt_1",
            },
        ],
        "addons": [],
        "metadata": {},
        "currency": "USD",
        "recurring_pre_tax_amount": 1000,
        "created_at": "2025-12-01T00:00:00Z",
        "on_demand": False,
        "payment_frequency_count": 1,
        "payment_frequency_interval": "Month",
        "subscription_period_count": 1,
        "subscription_period_interval": "Month",
        "tax_inclusive": False,
        "trial_period_days": 0,
    }
    return {"business_id": "bus_1", "type": "subscription.renewed", "timestamp": "2026-01-01T00:00:01Z", "data": data}


PAYLOADS: dict[str, Callable[[], dict[str, Any]]] = {
    "stripe customer.subscription.updated": stripe_subscription_event,
    "stripe invoice.paid": stripe_invoice_paid,
    "dodo credit.deducted": dodo_credit_deducted,
    "dodo subscription.renewed (cart, meters)": dodo_subscription,
}


def readers() -> dict[str, Callable[[dict[str, Any]], object]]:
    """How each handler reads its event: the envelope for dispatch, then the whole event."""
    from app.providers.dodo import objects as dodo
    from app.providers.stripe import objects as stripe

    return {
        "stripe customer.subscription.updated": lambda p: (stripe.event_type(p), stripe.parse_subscription_event(p)),
        "stripe invoice.paid": lambda p: (stripe.event_type(p), stripe.parse_paid_invoice(p)),
        "dodo credit.deducted": lambda p: (dodo.event_type(p), dodo.parse_ledger_entry(p)),
        "dodo subscription.renewed (cart, meters)": lambda p: (dodo.event_type(p), dodo.parse_subscription(p)),
    }


def measure(read: Callable[[dict[str, Any]], object], payload: dict[str, Any], repeat: int) -> float:
    """Best of `repeat` runs, in microseconds of this process's CPU per payload (the machine is shared)."""
    timer = timeit.Timer(lambda: read(payload), timer=time.process_time)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def run(read_with: dict[str, Callable[[dict[str, Any]], object]], repeat: int) -> dict[str, float]:
    results = {}
    for name, build in PAYLOADS.items():
        payload = build()
        read_with[name](copy.deepcopy(payload))  # it parses before it is timed
        results[name] = measure(read_with[name], payload, repeat)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    for name, micros in run(readers(), args.repeat).items():
        print(f"{name:42} {micros:8.2f} µs")


if __name__ == "__main__":
    main()
