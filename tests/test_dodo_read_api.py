"""The Dodo-shaped read API, read by the official dodopayments SDK against the live test server, and
`/credits`; customer-scoped tokens made with `tally keys create`."""

from __future__ import annotations

import dodopayments
import pytest
from conftest import SERVICE_TOKEN
from dodo_builders import apply_now, cart_line, ledger_entry, subscription
from dodopayments.types.credit_entitlements import CreditLedgerEntry, CustomerCreditBalance
from dodopayments.types.subscription_retrieve_credit_usage_response import SubscriptionRetrieveCreditUsageResponse
from sqlalchemy import select

from app.cli import main as tally
from app.keys import hash_token
from app.models import ApiKey

CUSTOMER = "cus_read"


def sdk(server, token: str = SERVICE_TOKEN) -> dodopayments.DodoPayments:
    return dodopayments.DodoPayments(bearer_token=token, base_url=server.url, max_retries=0)


def new_token(capsys, *args: str) -> str:
    assert tally(["keys", "create", *args]) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture
def account(db):
    """A Dodo subscription with two entitlements and a short ledger, applied out of order."""
    cart = [
        cart_line("cde_calls", name="API Calls", unit="calls", overage_limit="100.00"),
        cart_line(
            "cde_tokens", name="Tokens", unit="tokens", credits_amount="10", overage_enabled=False, overage_limit=None
        ),
    ]
    entries = [
        ledger_entry(
            "cle_r1",
            CUSTOMER,
            "cde_calls",
            "credit_added",
            "250.00",
            ("0", "0"),
            ("250.00", "0"),
            "2026-03-01T00:00:00Z",
            grant_id="cdg_1",
        ),
        ledger_entry(
            "cle_r2",
            CUSTOMER,
            "cde_calls",
            "credit_deducted",
            "250.00",
            ("250.00", "0"),
            ("0", "0"),
            "2026-03-01T00:00:05.250000Z",
        ),
        ledger_entry(
            "cle_r3",
            CUSTOMER,
            "cde_calls",
            "overage_charged",
            "100.00",
            ("0", "0"),
            ("0", "100.00"),
            "2026-03-01T00:00:05.250000Z",
        ),
        ledger_entry(
            "cle_t1", CUSTOMER, "cde_tokens", "credit_added", "10", ("0", "0"), ("10", "0"), "2026-03-01T00:00:00Z"
        ),
        ledger_entry(
            "cle_t2", CUSTOMER, "cde_tokens", "credit_deducted", "10", ("10", "0"), ("0", "0"), "2026-03-02T00:00:00Z"
        ),
    ]
    for index, payload in enumerate(reversed(entries)):
        assert apply_now(db, payload, f"msg_read_{index}") == "processed"
    assert apply_now(db, subscription("sub_read", CUSTOMER, cart=cart), "msg_read_sub") == "processed"
    apply_now(db, subscription("sub_other", "cus_other", cart=[cart_line("cde_calls")]), "msg_other_sub")


def test_credit_usage_parses_as_the_sdk_model_with_the_seed_values(server, account):
    usage = sdk(server).subscriptions.retrieve_credit_usage("sub_read")
    assert isinstance(usage, SubscriptionRetrieveCreditUsageResponse)
    assert usage.subscription_id == "sub_read"
    calls, tokens = usage.items
    assert (calls.credit_entitlement_id, calls.credit_entitlement_name, calls.unit) == (
        "cde_calls",
        "API Calls",
        "calls",
    )
    assert (calls.balance, calls.overage, calls.overage_enabled) == ("0.00", "100.00", True)
    assert (calls.overage_limit, calls.remaining_headroom, calls.limit_reached) == ("100.00", "0.00", True)
    assert (tokens.balance, tokens.overage, tokens.overage_enabled) == ("0", "0", False)
    assert (tokens.overage_limit, tokens.remaining_headroom, tokens.limit_reached) == (None, None, True)


def test_credit_usage_raw_types_are_the_seed_types(http, service_headers, account):
    item = http.get("/subscriptions/sub_read/credit-usage", headers=service_headers).json()["items"][0]
    assert {key: type(value).__name__ for key, value in item.items()} == {
        "credit_entitlement_id": "str",
        "credit_entitlement_name": "str",
        "unit": "str",
        "balance": "str",
        "overage": "str",
        "overage_enabled": "bool",
        "overage_limit": "str",
        "remaining_headroom": "str",
        "limit_reached": "bool",
    }


def test_balance_and_ledger_parse_as_sdk_models(server, account):
    client = sdk(server)
    balance = client.credit_entitlements.balances.retrieve(CUSTOMER, credit_entitlement_id="cde_calls")
    assert isinstance(balance, CustomerCreditBalance)
    assert (balance.customer_id, balance.credit_entitlement_id, balance.balance, balance.overage) == (
        CUSTOMER,
        "cde_calls",
        "0.00",
        "100.00",
    )
    assert balance.last_transaction_at is not None and balance.last_transaction_at.microsecond == 250000

    page = client.credit_entitlements.balances.list_ledger(CUSTOMER, credit_entitlement_id="cde_calls")
    assert all(isinstance(entry, CreditLedgerEntry) for entry in page.items)
    # Newest first in Dodo's order: the overage charge follows the deduction within the same instant.
    assert [entry.id for entry in page.items] == ["cle_r3", "cle_r2", "cle_r1"]
    newest, _, oldest = page.items
    assert (newest.transaction_type, newest.amount, newest.is_credit) == ("overage_charged", "100.00", False)
    assert (newest.overage_before, newest.overage_after) == ("0.00", "100.00")
    assert (oldest.grant_id, oldest.balance_after, oldest.business_id) == ("cdg_1", "250.00", "bus_test")

    second = client.credit_entitlements.balances.list_ledger(
        CUSTOMER, credit_entitlement_id="cde_calls", page_size=2, page_number=1
    )
    assert [entry.id for entry in second.items] == ["cle_r1"]
    deductions = client.credit_entitlements.balances.list_ledger(
        CUSTOMER, credit_entitlement_id="cde_calls", transaction_type="credit_deducted"
    )
    assert [entry.id for entry in deductions.items] == ["cle_r2"]


def test_an_absent_balance_is_a_404_with_code_and_message(server, http, service_headers, account):
    with pytest.raises(dodopayments.NotFoundError):
        sdk(server).credit_entitlements.balances.retrieve("cus_nobody", credit_entitlement_id="cde_calls")
    response = http.get("/credit-entitlements/cde_nothing/balances/cus_read", headers=service_headers)
    assert response.status_code == 404 and set(response.json()) == {"code", "message"}
    assert (
        http.get("/credit-entitlements/cde_nothing/balances/cus_read/ledger", headers=service_headers).status_code
        == 404
    )
    assert http.get("/subscriptions/sub_nothing/credit-usage", headers=service_headers).status_code == 404
    assert (
        http.get(
            "/credit-entitlements/cde_calls/balances/cus_read/ledger",
            headers=service_headers,
            params={"page_size": 101},
        ).status_code
        == 422
    )


def test_credits_totals_for_the_customer_of_the_credentials(db, server, http, service_headers, account, capsys):
    token = new_token(capsys, "--customer", CUSTOMER)
    mine = {"Authorization": f"Bearer {token}"}
    response = http.get("/credits", headers=mine)
    assert response.status_code == 200
    # calls: 250 granted, 250 deducted + 100 overage = 350 used, net -100; tokens: 10 granted, 10 used.
    assert response.json() == {"data": {"total_credits": 260, "total_usage": 360}}
    assert http.get("/credits", headers=service_headers, params={"customer_id": CUSTOMER}).json() == response.json()
    assert http.get("/credits", headers=mine, params={"customer_id": CUSTOMER}).status_code == 200
    assert http.get("/credits", headers=service_headers).status_code == 400
    assert http.get("/credits", headers=service_headers, params={"customer_id": "cus_ghost"}).status_code == 404


def test_a_customer_token_reads_only_its_own_customer(db, server, http, account, capsys):
    token = new_token(capsys, "--customer", CUSTOMER)
    with db.read() as session:
        key = session.execute(select(ApiKey)).scalar_one()
        assert (key.scope, key.customer_id, key.token_hash) == ("customer", CUSTOMER, hash_token(token))
        assert token not in {key.token_hash, key.label}  # stored hashed only

    own = sdk(server, token)
    assert own.subscriptions.retrieve_credit_usage("sub_read").subscription_id == "sub_read"
    assert own.credit_entitlements.balances.retrieve(CUSTOMER, credit_entitlement_id="cde_calls").balance == "0.00"
    with pytest.raises(dodopayments.PermissionDeniedError):
        own.subscriptions.retrieve_credit_usage("sub_other")
    with pytest.raises(dodopayments.PermissionDeniedError):
        own.credit_entitlements.balances.retrieve("cus_other", credit_entitlement_id="cde_calls")
    with pytest.raises(dodopayments.PermissionDeniedError):
        own.credit_entitlements.balances.list_ledger("cus_other", credit_entitlement_id="cde_calls")
    headers = {"Authorization": f"Bearer {token}"}
    assert http.get("/credits", headers=headers, params={"customer_id": "cus_other"}).status_code == 403
    assert http.get("/usage", headers=headers).json()["customer_id"] == CUSTOMER
    assert http.get("/usage", headers=headers, params={"customer_id": "cus_other"}).status_code == 403


def test_a_cli_service_token_reads_any_customer_and_no_token_is_401(server, http, account, capsys):
    service = sdk(server, new_token(capsys, "--service"))
    assert service.subscriptions.retrieve_credit_usage("sub_other").items[0].credit_entitlement_id == "cde_calls"
    with pytest.raises(dodopayments.AuthenticationError):
        sdk(server, "tly_not_a_token").subscriptions.retrieve_credit_usage("sub_read")
    assert http.get("/credits").status_code == 401
