"""POST /credit-entitlements/{ce}/balances/{customer_id}/ledger-entries: synchronous credits and debits."""

from __future__ import annotations

import uuid

import dodopayments
import pytest
from metering_support import balance_of, entry_count, new_customer

from app.keys import create_key
from app.models import CreditEntitlement

ROUTE = "/credit-entitlements/{ce}/balances/{customer}/ledger-entries"


def post(http, headers, ce: str, customer: str, body: dict):
    return http.post(ROUTE.format(ce=ce, customer=customer), json=body, headers=headers)


def test_credit_then_debit_answer_201_with_before_and_after(db, http, service_headers):
    customer = new_customer(db)
    response = post(
        http,
        service_headers,
        "tokens",
        customer,
        {
            "entry_type": "credit",
            "amount": "10.5",
            "idempotency_key": "k1",
            "reason": "welcome",
            "metadata": {"campaign": "spring"},
        },
    )
    assert response.status_code == 201, response.text
    credit = response.json()
    assert (credit["balance_before"], credit["balance_after"]) == ("0.00", "10.50")
    assert credit["amount"] == "10.50" and credit["is_credit"] is True and credit["grant_id"] is not None
    assert credit["metadata"] == {"campaign": "spring"} and credit["reason"] == "welcome"

    response = post(
        http, service_headers, "tokens", customer, {"entry_type": "debit", "amount": 12, "idempotency_key": "k2"}
    )
    assert response.status_code == 201, response.text
    debit = response.json()
    assert (debit["balance_before"], debit["balance_after"]) == ("10.50", "0.00")
    assert (debit["overage_before"], debit["overage_after"]) == ("0.00", "1.50")
    assert debit["entry_type"] == "debit" and debit["is_credit"] is False


def test_the_same_key_and_body_return_the_first_result_and_a_different_body_conflicts(db, http, service_headers):
    customer = new_customer(db)
    body = {"entry_type": "credit", "amount": "5", "idempotency_key": "same"}
    first = post(http, service_headers, "tokens", customer, body)
    again = post(http, service_headers, "tokens", customer, {**body, "amount": "5.00"})  # the same amount
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert entry_count(db) == 1

    conflict = post(http, service_headers, "tokens", customer, {**body, "amount": "6"})
    assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"
    assert balance_of(db, customer, "tokens").balance == 500


def test_a_debit_past_the_limit_is_refused_with_400_and_the_refusal_is_the_keys_answer(db, http, service_headers):
    customer = new_customer(db)
    post(http, service_headers, "tokens", customer, {"entry_type": "credit", "amount": "1", "idempotency_key": "c"})
    body = {"entry_type": "debit", "amount": "6.01", "idempotency_key": "too-much"}  # 1 + overage limit 5
    refused = post(http, service_headers, "tokens", customer, body)
    assert refused.status_code == 400
    assert refused.json()["code"] == "limit_exceeded" and refused.json()["message"]
    post(http, service_headers, "tokens", customer, {"entry_type": "credit", "amount": "100", "idempotency_key": "c2"})
    assert post(http, service_headers, "tokens", customer, body).json() == refused.json()  # sticky
    balance = balance_of(db, customer, "tokens")
    assert (balance.balance, balance.overage) == (10100, 0)

    at_limit = post(
        http, service_headers, "seats", customer, {"entry_type": "debit", "amount": "1", "idempotency_key": "s"}
    )
    assert at_limit.status_code == 400 and at_limit.json()["code"] == "insufficient_credits"  # overage disabled


@pytest.mark.parametrize(
    "amount,code",
    [
        ("-1", "invalid_amount"),
        ("0", "invalid_amount"),
        ("abc", "invalid_amount"),
        (1.5, "invalid_amount"),
        ("1.234", "invalid_amount"),
        (None, "invalid_amount"),
        ("NaN", "invalid_amount"),
        ("1e30", "invalid_amount"),
    ],
)
def test_bad_amounts_are_refused_with_422_and_nothing_is_written(db, http, service_headers, amount, code):
    customer = new_customer(db)
    response = post(
        http,
        service_headers,
        "tokens",
        customer,
        {"entry_type": "credit", "amount": amount, "idempotency_key": uuid.uuid4().hex},
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert entry_count(db) == 0 and balance_of(db, customer, "tokens") is None


def test_unknown_customers_entitlements_bodies_and_tokens_are_refused(db, http, service_headers):
    customer = new_customer(db)
    body = {"entry_type": "credit", "amount": "1", "idempotency_key": "x"}
    assert post(http, service_headers, "tokens", "cus_nobody", body).status_code == 404
    assert post(http, service_headers, "no_such_ce", customer, body).status_code == 404
    assert (
        post(
            http, service_headers, "tokens", customer, {"entry_type": "gift", "amount": "1", "idempotency_key": "x"}
        ).status_code
        == 422
    )
    assert post(http, service_headers, "tokens", customer, {"entry_type": "credit", "amount": "1"}).status_code == 422
    assert post(http, {}, "tokens", customer, body).status_code == 401
    token = create_key(db, scope="customer", customer_id=customer)
    assert post(http, {"Authorization": f"Bearer {token}"}, "tokens", customer, body).status_code == 403
    assert entry_count(db) == 0


def test_provider_managed_entitlements_refuse_local_writes_with_409(db, http, service_headers):
    customer = new_customer(db)
    with db.write() as session:
        session.add(
            CreditEntitlement(
                id="cde_dodo_1",
                managed_by="dodo",
                name="Dodo credits",
                unit="credit",
                precision=2,
                overage_enabled=False,
            )
        )
    response = post(
        http, service_headers, "cde_dodo_1", customer, {"entry_type": "credit", "amount": "1", "idempotency_key": "x"}
    )
    assert response.status_code == 409 and response.json()["code"] == "provider_managed"
    assert entry_count(db) == 0


def test_the_official_sdk_reads_the_answer(db, server, service_headers):
    customer = new_customer(db)
    client = dodopayments.DodoPayments(
        bearer_token=service_headers["Authorization"].split()[1], base_url=server.url, max_retries=0
    )
    entry = client.credit_entitlements.balances.create_ledger_entry(
        customer, credit_entitlement_id="storage", amount="2.5", entry_type="credit", idempotency_key="sdk-1"
    )
    assert entry.balance_after == "2.5" and entry.customer_id == customer and entry.is_credit
    with pytest.raises(dodopayments.BadRequestError):
        client.credit_entitlements.balances.create_ledger_entry(
            customer, credit_entitlement_id="seats", amount="1", entry_type="debit", idempotency_key="sdk-2"
        )
