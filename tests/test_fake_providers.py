"""The fake provider APIs answer the official SDKs exactly as the real APIs do.

Reconciliation tests will trust these fakes, so each behaviour reconciliation depends on is pinned
here through `stripe.StripeClient` and `dodopayments.DodoPayments` themselves: pagination as the
SDKs walk it, the query encoding they send, the error classes they raise, connection failures.
The Dodo client validates responses strictly, so a shape that drifts from the SDK's models fails.
"""

from __future__ import annotations

import itertools
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import dodopayments
import pytest
import stripe
from dodopayments.types import CreditDeductedWebhookEvent, CreditOverageChargedWebhookEvent
from fakes.dodo_api import DodoFake, LedgerError
from fakes.stripe_api import StripeFake
from stripe.events import V1BillingMeterErrorReportTriggeredEvent

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z


class Clock:
    """A provider clock that tests move by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def no_proxy_for_the_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests and httpx honour HTTP(S)_PROXY: a developer's proxy must not swallow calls to 127.0.0.1."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stripe_fake(clock: Clock) -> Iterator[StripeFake]:
    with StripeFake(clock=clock) as fake:
        yield fake


@pytest.fixture
def stripe_client(stripe_fake: StripeFake) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_fake", base_addresses={"api": stripe_fake.url}, max_network_retries=0)


@pytest.fixture
def dodo_fake(clock: Clock) -> Iterator[DodoFake]:
    with DodoFake(clock=clock) as fake:
        yield fake


@pytest.fixture
def dodo_client(dodo_fake: DodoFake) -> dodopayments.DodoPayments:
    return dodopayments.DodoPayments(
        bearer_token="dodo_test_fake", base_url=dodo_fake.url, max_retries=0, _strict_response_validation=True
    )


# -- Stripe: lists -----------------------------------------------------------------------------------


def test_stripe_auto_paging_returns_every_subscription_once_in_three_calls(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient
) -> None:
    created = [stripe_fake.create_subscription(f"cus_{n}", created=NOW + n // 3)["id"] for n in range(250)]

    listed = [
        sub.id for sub in stripe_client.v1.subscriptions.list(params={"status": "all", "limit": 100}).auto_paging_iter()
    ]

    assert listed == created[::-1]  # newest first; ties (same second) newest-inserted first
    assert stripe_fake.calls_to("/v1/subscriptions") == 3
    second = stripe_fake.log[1]
    assert dict(second.query) == {"status": "all", "limit": "100", "starting_after": listed[99]}


def test_stripe_status_filters_as_stripe_documents(stripe_fake: StripeFake, stripe_client: stripe.StripeClient) -> None:
    for status in ("active", "past_due", "canceled", "incomplete_expired", "trialing"):
        stripe_fake.create_subscription(f"cus_{status}", status=status)

    def statuses(params: stripe.params.SubscriptionListParams) -> set[str]:
        return {sub.status for sub in stripe_client.v1.subscriptions.list(params=params).auto_paging_iter()}

    assert statuses({}) == {"active", "past_due", "incomplete_expired", "trialing"}  # default: not canceled
    assert statuses({"status": "all"}) == {"active", "past_due", "canceled", "incomplete_expired", "trialing"}
    assert statuses({"status": "ended"}) == {"canceled", "incomplete_expired"}
    assert statuses({"status": "past_due"}) == {"past_due"}
    assert statuses({"status": "all", "customer": "cus_active"}) == {"active"}


def test_stripe_ending_before_pages_back_towards_the_newest(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient
) -> None:
    ids = [stripe_fake.create_subscription(created=NOW + n)["id"] for n in range(25)]

    page = stripe_client.v1.subscriptions.list(params={"status": "all", "limit": 10, "ending_before": ids[5]})

    assert [sub.id for sub in page.data] == ids[15:5:-1]
    assert page.has_more is True
    walked = [
        sub.id
        for sub in stripe_client.v1.subscriptions.list(
            params={"status": "all", "limit": 10, "ending_before": ids[5]}
        ).auto_paging_iter()
    ]
    assert walked == ids[6:]


def test_stripe_subscription_has_the_recent_api_shape(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient
) -> None:
    stripe_fake.add_price(
        "price_pro", product="prod_pro", lookup_key="pro_monthly", metadata={"included": "1000", "unit": "requests"}
    )
    stripe_fake.create_subscription(
        "cus_1", price="price_pro", subscription_id="sub_1", quantity=2, metadata={"team": "a"}
    )

    sub = stripe_client.v1.subscriptions.retrieve("sub_1", params={"expand": ["customer", "latest_invoice"]})

    item = sub["items"].data[0]
    assert (item.current_period_start, item.current_period_end) == (NOW, NOW + 31 * 86400)
    assert "current_period_start" not in sub  # moved to the items in 2025-03-31
    assert (item.price.id, item.price.product, item.price.lookup_key) == ("price_pro", "prod_pro", "pro_monthly")
    assert item.price.metadata.to_dict() == {"included": "1000", "unit": "requests"}
    assert (item.quantity, sub.status, sub.cancel_at_period_end, sub.canceled_at) == (2, "active", False, None)
    assert isinstance(sub.customer, stripe.Customer) and sub.customer.id == "cus_1"
    assert sub.metadata.to_dict() == {"team": "a"}
    invoice = sub.latest_invoice
    assert isinstance(invoice, stripe.Invoice) and invoice.parent and invoice.parent.subscription_details
    assert invoice.parent.subscription_details.subscription == "sub_1"
    assert stripe_fake.log[-1].query == (("expand[0]", "customer"), ("expand[1]", "latest_invoice"))
    assert stripe_client.v1.customers.retrieve("cus_1").email == "cus_1@example.com"
    assert stripe_client.v1.invoices.retrieve(invoice.id).status == "paid"


# -- Stripe: events ----------------------------------------------------------------------------------


def test_stripe_undelivered_events_since_a_time(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient, clock: Clock
) -> None:
    stripe_fake.create_subscription("cus_old", delivered=False)  # undelivered, but before the window
    clock.advance(3600)
    since = int(clock())
    lost = stripe_fake.create_subscription("cus_lost", delivered=False)
    stripe_fake.create_subscription("cus_ok")  # delivered
    clock.advance(60)
    stripe_fake.cancel_subscription(lost["id"], delivered=False)

    events = list(
        stripe_client.v1.events.list(params={"delivery_success": False, "created": {"gte": since}}).auto_paging_iter()
    )

    assert [(event.type, event.data.object.id) for event in events] == [
        ("customer.subscription.deleted", lost["id"]),
        ("customer.subscription.created", lost["id"]),
    ]
    assert all(event.pending_webhooks == 1 for event in events)
    assert stripe_fake.log[-1].query == (("delivery_success", "false"), ("created[gte]", str(since)))
    only = stripe_client.v1.events.list(params={"types": ["customer.subscription.deleted"]})
    assert [event.type for event in only.data] == ["customer.subscription.deleted"]
    wildcard = stripe_client.v1.events.list(params={"type": "customer.subscription.*", "limit": 100})
    assert len(wildcard.data) == 4


def test_stripe_lists_events_of_the_last_30_days_only(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient, clock: Clock
) -> None:
    old = stripe_fake.add_event(
        "customer.subscription.updated", {"id": "sub_x", "object": "subscription"}, delivered=False
    )
    clock.advance(30 * 86400 + 1)

    assert stripe_client.v1.events.list(params={"delivery_success": False}).data == []
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.events.retrieve(old["id"])


def test_stripe_renewal_sends_updated_then_invoice_paid(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient
) -> None:
    sub = stripe_fake.create_subscription("cus_1", price="price_basic")
    end = sub["items"]["data"][0]["current_period_end"]

    renewed = stripe_fake.renew_subscription(sub["id"])

    assert renewed["items"]["data"][0]["current_period_start"] == end
    updated, paid = (
        stripe_client.v1.events.list(params={"types": [kind]}).data[0]
        for kind in ("customer.subscription.updated", "invoice.paid")
    )
    previous = updated.data.previous_attributes
    assert previous is not None and previous["items"]["data"][0]["current_period_end"] == end
    assert paid.data.object.parent.subscription_details.subscription == sub["id"]
    assert paid.data.object.lines.data[0].period.start == end
    assert stripe_fake.renew_subscription(sub["id"], paid=False)["status"] == "past_due"


def test_stripe_event_json_verifies_as_a_webhook(stripe_fake: StripeFake) -> None:
    subscription = stripe_fake.create_subscription("cus_1")
    payload = stripe_fake.event_json(stripe_fake.last_event()["id"])
    header = stripe.WebhookSignature.generate_signature_header(payload, "whsec_fake")

    verified = stripe.Webhook.construct_event(payload, header, "whsec_fake")

    assert verified.type == "customer.subscription.created" and verified.data.object.id == subscription["id"]


def test_stripe_thin_event_retrieves_through_v2(stripe_fake: StripeFake, stripe_client: stripe.StripeClient) -> None:
    thin = stripe_fake.add_thin_event(
        "v1.billing.meter.error_report_triggered",
        {"id": "mtr_1", "type": "billing.meter", "url": "/v1/billing/meters/mtr_1"},
        data={
            "developer_message_summary": "1 invalid event",
            "reason": {"error_count": 1, "error_types": []},
            "validation_start": "2026-01-01T00:00:00.000Z",
            "validation_end": "2026-01-01T00:01:00.000Z",
        },
    )

    event = stripe_client.v2.core.events.retrieve(thin["id"])

    assert isinstance(event, V1BillingMeterErrorReportTriggeredEvent)
    assert event.related_object.id == "mtr_1" and event.data.developer_message_summary == "1 invalid event"
    assert stripe_fake.thin_notification(thin["id"])["related_object"]["url"] == "/v1/billing/meters/mtr_1"
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v2.core.events.retrieve("evt_missing")


# -- Stripe: errors and faults -------------------------------------------------------------------------


def test_stripe_unknown_ids_and_bad_parameters_raise_invalid_request(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v1.subscriptions.retrieve("sub_missing")
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")
    for retrieve in (
        stripe_client.v1.events.retrieve,
        stripe_client.v1.customers.retrieve,
        stripe_client.v1.invoices.retrieve,
    ):
        with pytest.raises(stripe.InvalidRequestError):
            retrieve("x_missing")
    misspelt: Any = {"statuss": "all"}
    with pytest.raises(stripe.InvalidRequestError) as typo:
        stripe_client.v1.subscriptions.list(params=misspelt)
    assert (typo.value.http_status, typo.value.param) == (400, "statuss")
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.subscriptions.list(params={"limit": 101})


def test_stripe_requires_a_secret_key(stripe_fake: StripeFake) -> None:
    client = stripe.StripeClient("pk_test_publishable", base_addresses={"api": stripe_fake.url}, max_network_retries=0)
    with pytest.raises(stripe.AuthenticationError):
        client.v1.subscriptions.list()


def test_stripe_rate_limit_surfaces_with_retry_after(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient
) -> None:
    stripe_fake.fail_next(1, status=429, retry_after=2)

    with pytest.raises(stripe.RateLimitError) as limited:
        stripe_client.v1.subscriptions.list()

    assert limited.value.http_status == 429
    assert limited.value.headers is not None and limited.value.headers["Retry-After"] == "2"
    body = limited.value.json_body
    assert isinstance(body, dict) and body["error"]["code"] == "rate_limit"
    assert stripe_client.v1.subscriptions.list().data == []  # the next request gets through
    assert stripe_fake.calls == 2  # the SDK did not retry the 429


def test_stripe_server_errors_and_path_scoped_faults(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient
) -> None:
    stripe_fake.fail_next(1, status=503, path_prefix="/v1/events")

    stripe_client.v1.subscriptions.list()  # other endpoints are unaffected
    with pytest.raises(stripe.APIError) as failed:
        stripe_client.v1.events.list()

    assert failed.value.http_status == 503
    assert stripe_fake.calls_by_path() == {"/v1/subscriptions": 1, "/v1/events": 1}


def test_stripe_down_refuses_connections_until_up(stripe_fake: StripeFake, stripe_client: stripe.StripeClient) -> None:
    stripe_fake.create_subscription("cus_1")
    port = stripe_fake.port
    stripe_client.v1.subscriptions.list()  # a pooled keep-alive connection exists now

    stripe_fake.down()
    with pytest.raises(stripe.APIConnectionError):
        stripe_client.v1.subscriptions.list()
    stripe_fake.up()

    assert stripe_fake.port == port and len(stripe_client.v1.subscriptions.list().data) == 1
    stripe_fake.reset_next(1)
    with pytest.raises(stripe.APIConnectionError):
        stripe_client.v1.subscriptions.list()


def test_stripe_fifty_thousand_subscriptions_page_by_bisection(
    stripe_fake: StripeFake, stripe_client: stripe.StripeClient
) -> None:
    started = time.process_time()
    ids = stripe_fake.seed_subscriptions(50_000)
    assert time.process_time() - started < 5  # CPU time: a loaded machine must not fail it

    tracemalloc.start()
    try:
        deep = stripe_client.v1.subscriptions.list(params={"limit": 100, "starting_after": ids[30_000]})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tail = stripe_client.v1.subscriptions.list(params={"limit": 100, "starting_after": ids[100]})

    assert [sub.id for sub in deep.data] == ids[29_999:29_899:-1] and deep.has_more
    assert len(tail.data) == 100 and not tail.has_more
    assert peak < 20_000_000  # one page's worth (client included), not a copy of 50,000 subscriptions


# -- Dodo: pagination --------------------------------------------------------------------------------


def test_dodo_paging_by_hand_from_page_zero_gets_every_balance(
    dodo_fake: DodoFake, dodo_client: dodopayments.DodoPayments
) -> None:
    dodo_fake.add_entitlement("cde_calls")
    customers = dodo_fake.seed_balances("cde_calls", 250)

    seen: list[str] = []
    page_number = 0
    while True:
        page = dodo_client.credit_entitlements.balances.list("cde_calls", page_number=page_number, page_size=100)
        seen += [balance.customer_id for balance in page.items]
        if len(page.items) < 100:
            break
        page_number += 1

    assert seen == customers
    assert dodo_fake.calls == 3


def test_dodo_sdk_auto_pagination_skips_page_one(dodo_fake: DodoFake, dodo_client: dodopayments.DodoPayments) -> None:
    """Why reconciliation pages by hand: the SDK asks for page (page_number or 1) + 1 after page 0."""
    dodo_fake.add_entitlement("cde_calls")
    customers = dodo_fake.seed_balances("cde_calls", 250)

    seen = [
        balance.customer_id
        for balance in dodo_client.credit_entitlements.balances.list("cde_calls", page_number=0, page_size=100)
    ]

    assert seen == customers[:100] + customers[200:]  # page 1 (customers 100..199) never requested
    assert [dict(call.query).get("page_number") for call in dodo_fake.log] == ["0", "2", "3"]


def test_dodo_page_size_above_100_is_refused(dodo_fake: DodoFake, dodo_client: dodopayments.DodoPayments) -> None:
    dodo_fake.add_entitlement("cde_calls")
    with pytest.raises(dodopayments.UnprocessableEntityError):
        dodo_client.credit_entitlements.balances.list("cde_calls", page_size=101)


# -- Dodo: the ledger --------------------------------------------------------------------------------


def test_dodo_ledger_model_moves_balance_then_overage(dodo_fake: DodoFake) -> None:
    dodo_fake.add_entitlement("cde_calls", overage_enabled=True, overage_limit="150")

    added = dodo_fake.grant("cus_1", "cde_calls", "1000")
    used = dodo_fake.deduct("cus_1", "cde_calls", "300")
    crossing = dodo_fake.deduct("cus_1", "cde_calls", "800")

    def row(entry: dict[str, object]) -> tuple[object, ...]:
        return (
            entry["transaction_type"],
            entry["amount"],
            entry["is_credit"],
            entry["balance_before"],
            entry["balance_after"],
            entry["overage_before"],
            entry["overage_after"],
        )

    assert [row(entry) for entry in [added, *used, *crossing]] == [
        ("credit_added", "1000.00", True, "0.00", "1000.00", "0.00", "0.00"),
        ("credit_deducted", "300.00", False, "1000.00", "700.00", "0.00", "0.00"),
        ("credit_deducted", "700.00", False, "700.00", "0.00", "0.00", "0.00"),
        ("overage_charged", "100.00", False, "0.00", "0.00", "0.00", "100.00"),
    ]
    assert used[0]["grant_id"] == added["grant_id"]
    dodo_fake.deduct("cus_1", "cde_calls", "60")  # 100 < 150: allowed, overage may pass the limit once
    with pytest.raises(LedgerError):
        dodo_fake.deduct("cus_1", "cde_calls", "1")  # 160 >= 150: the limit is reached
    reset = dodo_fake.reset_overage("cus_1", "cde_calls")
    assert reset is not None and (reset["overage_before"], reset["overage_after"]) == ("160.00", "0.00")
    chain = dodo_fake.ledger("cus_1", "cde_calls")
    assert all(
        a["balance_after"] == b["balance_before"] and a["overage_after"] == b["overage_before"]
        for a, b in itertools.pairwise(chain)
    )


def test_dodo_ledger_model_variants(clock: Clock) -> None:
    fake = DodoFake(clock=clock, crossing_deduction="single")
    fake.add_entitlement("cde_over", overage_enabled=True)
    fake.add_entitlement("cde_capped", overage_enabled=False, precision=0)
    fake.add_entitlement("cde_repay", overage_enabled=True, overage_behavior="carry_deficit_auto_repay")

    fake.grant("cus_1", "cde_over", "10")
    [single] = fake.deduct("cus_1", "cde_over", "25")
    fake.grant("cus_1", "cde_capped", "10")
    [capped] = fake.deduct("cus_1", "cde_capped", "25")
    fake.deduct("cus_1", "cde_repay", "30")
    repaid = fake.grant("cus_1", "cde_repay", "50")

    assert (single["amount"], single["balance_after"], single["overage_after"]) == ("25.00", "0.00", "15.00")
    assert (capped["amount"], capped["balance_after"], capped["overage_after"]) == ("10", "0", "0")
    assert fake.deduct("cus_1", "cde_capped", "5") == []  # nothing left and no overage: nothing recorded
    assert (repaid["balance_after"], repaid["overage_before"], repaid["overage_after"]) == ("20.00", "30.00", "0.00")
    with pytest.raises(LedgerError):
        fake.add_entry("cus_1", "cde_capped", "credit_expired", "1")  # a balance never goes below zero


def test_dodo_list_ledger_filters_by_date_and_type(
    dodo_fake: DodoFake, dodo_client: dodopayments.DodoPayments, clock: Clock
) -> None:
    dodo_fake.add_entitlement("cde_calls", overage_enabled=True)
    dodo_fake.grant("cus_1", "cde_calls", "100")
    clock.advance(3600)
    since = datetime.fromtimestamp(clock(), UTC)
    recent = [dodo_fake.deduct("cus_1", "cde_calls", "10")[0]["id"]]
    clock.advance(60)
    recent += [entry["id"] for entry in dodo_fake.deduct("cus_1", "cde_calls", "95")]

    ledger = dodo_client.credit_entitlements.balances.list_ledger(
        "cus_1", credit_entitlement_id="cde_calls", start_date=since, page_size=100
    )

    assert [entry.id for entry in ledger.items] == recent[::-1]  # newest first
    assert dict(dodo_fake.log[-1].query)["start_date"] == since.isoformat()  # "…+00:00", as the SDK sends it
    charged = dodo_client.credit_entitlements.balances.list_ledger(
        "cus_1", credit_entitlement_id="cde_calls", transaction_type="overage_charged"
    )
    assert [entry.amount for entry in charged.items] == ["5.00"]
    before = dodo_client.credit_entitlements.balances.list_ledger(
        "cus_1", credit_entitlement_id="cde_calls", end_date=since - timedelta(seconds=1)
    )
    assert [entry.transaction_type for entry in before.items] == ["credit_added"]


def test_dodo_balance_drift_no_entry_explains(dodo_fake: DodoFake, dodo_client: dodopayments.DodoPayments) -> None:
    dodo_fake.add_entitlement("cde_calls")
    last = dodo_fake.grant("cus_1", "cde_calls", "100")

    dodo_fake.set_balance_without_entry("cus_1", "cde_calls", balance="90")

    balance = dodo_client.credit_entitlements.balances.retrieve("cus_1", credit_entitlement_id="cde_calls")
    assert (balance.balance, last["balance_after"]) == ("90.00", "100.00")
    assert balance.last_transaction_at == datetime.fromisoformat(last["created_at"])


def test_dodo_renewal_expires_resets_and_grants(dodo_fake: DodoFake, dodo_client: dodopayments.DodoPayments) -> None:
    dodo_fake.add_entitlement("cde_calls", overage_enabled=True, overage_limit="100")
    sub = dodo_fake.add_subscription("cus_1", cart=[("cde_calls", "1000")])
    dodo_fake.deduct("cus_1", "cde_calls", "400")

    entries = dodo_fake.renew_subscription(sub["subscription_id"])

    assert [(entry["transaction_type"], entry["amount"]) for entry in entries] == [
        ("credit_expired", "600.00"),
        ("credit_added", "1000.00"),
    ]
    usage = dodo_client.subscriptions.retrieve_credit_usage(sub["subscription_id"])
    assert (usage.items[0].balance, usage.items[0].remaining_headroom) == ("1000.00", "100.00")
    renewed = dodo_client.subscriptions.retrieve(sub["subscription_id"])
    assert renewed.previous_billing_date == datetime.fromisoformat(sub["next_billing_date"])


def test_dodo_webhook_payload_is_the_sdk_webhook_model(dodo_fake: DodoFake) -> None:
    dodo_fake.add_entitlement("cde_calls", overage_enabled=True)
    dodo_fake.grant("cus_1", "cde_calls", "5")
    deducted, charged = dodo_fake.deduct("cus_1", "cde_calls", "7")

    first = CreditDeductedWebhookEvent.model_validate(dodo_fake.webhook_payload(deducted))
    second = CreditOverageChargedWebhookEvent.model_validate(dodo_fake.webhook_payload(charged))

    assert (first.type, first.data.balance_after) == ("credit.deducted", "0.00")
    assert (second.type, Decimal(second.data.overage_after)) == ("credit.overage_charged", Decimal(2))


def test_dodo_every_endpoint_matches_the_sdk_models(
    dodo_fake: DodoFake, dodo_client: dodopayments.DodoPayments
) -> None:
    dodo_fake.add_entitlement("cde_calls", overage_enabled=True, overage_limit="50")
    sub = dodo_fake.add_subscription("cus_1", cart=[("cde_calls", "100")])["subscription_id"]

    assert dodo_client.credit_entitlements.list(page_size=100).items[0].id == "cde_calls"
    assert dodo_client.credit_entitlements.retrieve("cde_calls").overage_limit == 50
    assert dodo_client.credit_entitlements.balances.list("cde_calls", customer_id="cus_1").items[0].balance == "100.00"
    grants = dodo_client.credit_entitlements.balances.list_grants(
        "cus_1", credit_entitlement_id="cde_calls", status="active"
    )
    assert grants.items[0].remaining_amount == "100.00" and grants.items[0].source_id == sub
    assert dodo_client.subscriptions.list(status="active").items[0].subscription_id == sub
    assert dodo_client.subscriptions.retrieve(sub).credit_entitlement_cart[0].credits_amount == "100.00"
    with pytest.raises(dodopayments.NotFoundError) as missing:
        dodo_client.subscriptions.retrieve("sub_missing")
    assert isinstance(missing.value.body, dict) and set(missing.value.body) == {"code", "message"}


# -- Dodo: errors and faults -------------------------------------------------------------------------


def test_dodo_rate_limit_server_error_and_down(dodo_fake: DodoFake, dodo_client: dodopayments.DodoPayments) -> None:
    dodo_fake.fail_next(1, status=429, retry_after=3)
    with pytest.raises(dodopayments.RateLimitError) as limited:
        dodo_client.credit_entitlements.list()
    assert limited.value.response.headers["retry-after"] == "3"
    assert isinstance(limited.value.body, dict) and set(limited.value.body) == {"code", "message"}

    dodo_fake.fail_next(1, status=500)
    with pytest.raises(dodopayments.InternalServerError):
        dodo_client.credit_entitlements.list()

    dodo_fake.down()
    with pytest.raises(dodopayments.APIConnectionError):
        dodo_client.credit_entitlements.list()
    dodo_fake.up()
    assert dodo_client.credit_entitlements.list().items == []
    assert dodo_fake.calls == 3  # no SDK retries with max_retries=0; refused connections never arrive


def test_dodo_requires_the_bearer_token(clock: Clock) -> None:
    with DodoFake(clock=clock, api_key="dodo_test_right") as fake:
        wrong = dodopayments.DodoPayments(bearer_token="dodo_test_wrong", base_url=fake.url, max_retries=0)
        with pytest.raises(dodopayments.AuthenticationError):
            wrong.credit_entitlements.list()


def test_dodo_fifty_thousand_balances_page_flat(dodo_fake: DodoFake, dodo_client: dodopayments.DodoPayments) -> None:
    dodo_fake.add_entitlement("cde_calls")
    started = time.process_time()
    customers = dodo_fake.seed_balances("cde_calls", 50_000)
    assert time.process_time() - started < 5  # CPU time: a loaded machine must not fail it

    last = dodo_client.credit_entitlements.balances.list("cde_calls", page_number=499, page_size=100)
    beyond = dodo_client.credit_entitlements.balances.list("cde_calls", page_number=500, page_size=100)

    assert [balance.customer_id for balance in last.items] == customers[49_900:]
    assert beyond.items == []
