"""The reads on the event loop: answers field for field, the current-subscription rule in SQL, outages,
the connections lent to one-row reads, and the token cache (bounded, one lookup at a time, revocation
visible within a second)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from conftest import JOBS, SERVICE_TOKEN, LiveServer
from sqlalchemy import update
from test_usage import JULY, JUNE, subscribe, usage_at

from app.api.auth import TokenCache
from app.api.credit_documents import ReadConnections
from app.billing.snapshots import Watermark
from app.billing.subscriptions import SubscriptionSnapshot, apply_subscription_snapshot
from app.config import get_settings
from app.db import AsyncDatabase, Database
from app.errors import Unavailable
from app.keys import KeyScope, create_key, hash_token
from app.models import ApiKey
from app.web import create_app

INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def service(http: httpx.Client, path: str, **params: str) -> httpx.Response:
    return http.get(path, params=params, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"})


def without_instants(document: dict, *names: str) -> dict:
    for name in names:
        assert INSTANT.fullmatch(document[name]), (name, document[name])
    return {key: value for key, value in document.items() if key not in names}


# --- Tally-native balances on every read route ---------------------------------------------------


def test_a_plan_balance_reads_the_same_on_every_route(db, http):
    subscribe(db, "cus_n", "sub_n", used=1234)
    assert service(http, "/subscriptions/sub_n/credit-usage").json() == {
        "subscription_id": "sub_n",
        "items": [
            {
                "credit_entitlement_id": "requests",
                "credit_entitlement_name": "API requests",
                "unit": "request",
                "balance": "3766",
                "overage": "0",
                "overage_enabled": True,
                "overage_limit": "1000",
                "remaining_headroom": "1000",
                "limit_reached": False,
            }
        ],
    }

    balance = service(http, "/credit-entitlements/requests/balances/cus_n").json()
    assert without_instants(balance, "created_at", "updated_at") == {
        "id": "1",
        "customer_id": "cus_n",
        "credit_entitlement_id": "requests",
        "balance": "3766",
        "overage": "0",
        "last_transaction_at": "2026-06-01T00:00:00Z",
    }

    entries = service(http, "/credit-entitlements/requests/balances/cus_n/ledger").json()["items"]
    # Newest first: the grant was written now, the deduction is dated at the period's start.
    assert [without_instants(entry, "created_at") for entry in entries] == [
        {
            "id": "1",
            "credit_entitlement_id": "requests",
            "customer_id": "cus_n",
            "transaction_type": "credit_added",
            "is_credit": True,
            "amount": "5000",
            "balance_before": "0",
            "balance_after": "5000",
            "overage_before": "0",
            "overage_after": "0",
            "grant_id": "1",
            "description": None,
            "reference_type": None,
            "reference_id": None,
            "metadata": {},
            "brand_id": "",
            "business_id": "",
        },
        {
            "id": "2",
            "credit_entitlement_id": "requests",
            "customer_id": "cus_n",
            "transaction_type": "credit_deducted",
            "is_credit": False,
            "amount": "1234",
            "balance_before": "5000",
            "balance_after": "3766",
            "overage_before": "0",
            "overage_after": "0",
            "grant_id": None,
            "description": None,
            "reference_type": None,
            "reference_id": None,
            "metadata": {},
            "brand_id": "",
            "business_id": "",
        },
    ]
    added = service(http, "/credit-entitlements/requests/balances/cus_n/ledger", transaction_type="credit_added")
    assert [entry["id"] for entry in added.json()["items"]] == ["1"]
    later = service(http, "/credit-entitlements/requests/balances/cus_n/ledger", start_date="2099-01-01T00:00:00Z")
    assert later.json() == {"items": []}

    assert service(http, "/credits", customer_id="cus_n").json() == {
        "data": {"total_credits": 5000, "total_usage": 1234}
    }


def test_credits_of_a_customer_without_balances_are_zero(db, http):
    with db.write() as session:
        apply_subscription_snapshot(session, _snapshot("cus_bare", "sub_bare", "active", JUNE), _mark("sub_bare"))
    assert service(http, "/credits", customer_id="cus_bare").json() == {"data": {"total_credits": 0, "total_usage": 0}}
    assert service(http, "/subscriptions/sub_bare/credit-usage").json() == {"subscription_id": "sub_bare", "items": []}


# --- GET /usage: which subscription speaks for the customer ---------------------------------------


def _snapshot(customer: str, sub_id: str, status: str, start: datetime | None) -> SubscriptionSnapshot:
    return SubscriptionSnapshot(
        id=sub_id,
        provider="stripe",
        customer_id=customer,
        status=status,
        product_id="prod_123",
        price_id="price_123",
        quantity=1,
        period_start=start,
        period_end=None if start is None else start + timedelta(days=30),
        cancel_at_period_end=False,
        canceled_at=None,
        ended_at=None,
        plan_key="basic",
    )


def _mark(sub_id: str) -> Watermark:
    return Watermark(at=1, rank=0, event_id=f"evt_{sub_id}")


def _current(db: Database, customer: str, subscriptions: list[tuple[str, str, datetime | None]]) -> dict:
    with db.write() as session:
        for sub_id, status, start in subscriptions:
            assert apply_subscription_snapshot(session, _snapshot(customer, sub_id, status, start), _mark(sub_id))
    return usage_at(db, JUNE + timedelta(days=2), customer_id=customer).json()


def test_a_live_subscription_speaks_before_a_newer_canceled_one(db):
    document = _current(
        db, "cus_l", [("sub_l_old_live", "past_due", JUNE - timedelta(days=60)), ("sub_l_new_dead", "canceled", JUNE)]
    )
    assert (document["plan_ids"]["subscription_id"], document["status"]) == ("sub_l_old_live", "past_due")
    assert document["usage_status"] == "ok" and document["credits"]["included"] == 0  # no balance: zeroed


def test_among_the_same_kind_the_newest_period_speaks_and_no_period_comes_last(db):
    document = _current(
        db,
        "cus_d",
        [
            ("sub_d_old", "canceled", JUNE - timedelta(days=60)),
            ("sub_d_new", "canceled", JUNE),
            ("sub_d_none", "canceled", None),
        ],
    )
    assert (document["plan_ids"]["subscription_id"], document["usage_status"]) == ("sub_d_new", "inactive")
    assert document["period"]["start"] == "2026-06-01T00:00:00Z"  # the subscription's own period


def test_the_subscriptions_balance_gives_the_period_and_unit(db):
    subscribe(db, "cus_b", "sub_b", used=10)
    with db.write() as session:  # a newer canceled subscription does not take over from the live one
        apply_subscription_snapshot(session, _snapshot("cus_b", "sub_b_dead", "canceled", JULY), _mark("sub_b_dead"))
    document = usage_at(db, JUNE + timedelta(days=3), customer_id="cus_b").json()
    assert (document["plan_ids"]["subscription_id"], document["unit"]) == ("sub_b", "request")
    assert document["credits"]["used"] == 10 and document["period"]["end"] == "2026-07-01T00:00:00Z"


# --- outages ------------------------------------------------------------------------------------


def test_every_read_answers_503_when_the_database_is_down(db):
    dead = Database("postgresql+psycopg://postgres@127.0.0.1:1/test")
    app = create_app(get_settings(), db=dead, jobs=JOBS, run_workers=False)
    paths = [
        "/usage?customer_id=cus_x",
        "/credits?customer_id=cus_x",
        "/subscriptions/sub_x/credit-usage",
        "/credit-entitlements/requests/balances/cus_x",
        "/credit-entitlements/requests/balances/cus_x/ledger",
    ]
    with LiveServer(app) as live, httpx.Client(base_url=live.url) as client:
        for path in paths:
            response = client.get(path, headers={"Authorization": f"Bearer {SERVICE_TOKEN}"})
            assert (response.status_code, response.json()["code"]) == (503, "database_unavailable"), path
        stored = client.get(paths[0], headers={"Authorization": "Bearer tly_a_stored_token_cannot_be_read"})
        assert (stored.status_code, stored.json()["code"]) == (503, "database_unavailable")


# --- the token cache ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_entries_live_at_most_the_ttl_known_or_unknown():
    clock, looked_up = Clock(), []

    async def run() -> None:
        cache = TokenCache(ttl=1.0, clock=clock)

        def lookup_of(token_hash: str, scope: KeyScope | None):
            async def lookup() -> KeyScope | None:
                looked_up.append(token_hash)
                return scope

            return lookup

        known, unknown = lookup_of("known", KeyScope("customer", "cus_1")), lookup_of("unknown", None)
        assert (await cache.resolve("known", known)).customer_id == "cus_1"
        assert await cache.resolve("unknown", unknown) is None
        clock.now += 0.99
        assert (await cache.resolve("known", known)).customer_id == "cus_1"
        assert await cache.resolve("unknown", unknown) is None
        assert looked_up == ["known", "unknown"]
        clock.now += 0.02  # past the second since the lookups started: both are read again
        await cache.resolve("known", lookup_of("known", None))  # revoked meanwhile
        await cache.resolve("unknown", unknown)
        assert looked_up == ["known", "unknown", "known", "unknown"]
        assert await cache.resolve("known", known) is None  # the revocation is what is cached now

    asyncio.run(run())


def test_the_cache_is_bounded_and_a_flood_of_unknown_tokens_keeps_the_known_ones():
    async def run() -> None:
        cache = TokenCache(ttl=60, max_known=3, max_unknown=5)

        async def found() -> KeyScope:
            return KeyScope("service")

        async def missing() -> None:
            return None

        for n in range(3):
            await cache.resolve(f"known-{n}", found)
        for n in range(10_000):
            await cache.resolve(f"made-up-{n}", missing)
        assert len(cache) == 8

        async def must_not_look_up() -> None:
            raise AssertionError("a known token was evicted by unknown ones")

        for n in range(3):
            assert await cache.resolve(f"known-{n}", must_not_look_up) is not None
        for n in range(3, 10):  # past its bound the least recently used known token goes
            await cache.resolve(f"known-{n}", found)
        assert len(cache) == 8

    asyncio.run(run())


def test_concurrent_requests_for_one_token_share_one_lookup_and_its_failure():
    async def run() -> None:
        cache, calls = TokenCache(), []
        release = asyncio.Event()

        async def slow() -> KeyScope:
            calls.append(1)
            await release.wait()
            return KeyScope("service")

        waiting = [asyncio.ensure_future(cache.resolve("hash", slow)) for _ in range(50)]
        await asyncio.sleep(0)
        release.set()
        assert {(await w).scope for w in waiting} == {"service"} and len(calls) == 1

        async def failing() -> None:
            calls.append(1)
            await asyncio.sleep(0.01)
            raise ConnectionError("database down")

        failed = await asyncio.gather(*(cache.resolve("other", failing) for _ in range(20)), return_exceptions=True)
        assert all(isinstance(error, ConnectionError) for error in failed) and len(calls) == 2
        with pytest.raises(ConnectionError):  # a failure is not remembered: the next request tries again
            await cache.resolve("other", failing)
        assert len(calls) == 3

    asyncio.run(run())


def test_a_revoked_token_stops_working_within_a_second(db, http):
    subscribe(db, "cus_r", "sub_r", used=1)
    token = create_key(db, scope="customer", customer_id="cus_r")
    headers = {"Authorization": f"Bearer {token}"}
    assert http.get("/usage", headers=headers).status_code == 200
    with db.write() as session:
        session.execute(
            update(ApiKey).where(ApiKey.token_hash == hash_token(token)).values(revoked_at=datetime.now(UTC))
        )
    revoked_at = time.monotonic()
    while True:  # any request sent more than a second after the revocation must be refused
        sent = time.monotonic()
        if http.get("/usage", headers=headers).status_code != 200:
            break
        assert sent - revoked_at < 1.05, "the revoked token still works after a second"
        time.sleep(0.02)
    assert http.get("/usage", headers=headers).json()["code"] == "unauthorized"


def test_a_new_token_works_within_a_second_even_after_being_refused(db, http):
    subscribe(db, "cus_t", "sub_t", used=1)
    token = "tly_created_right_after_a_failed_try_0123456789"
    headers = {"Authorization": f"Bearer {token}"}
    assert http.get("/usage", headers=headers).status_code == 401
    with db.write() as session:
        session.add(ApiKey(token_hash=hash_token(token), scope="customer", customer_id="cus_t"))
    created_at = time.monotonic()
    while True:
        sent = time.monotonic()
        if http.get("/usage", headers=headers).status_code != 401:
            break
        assert sent - created_at < 1.05, "the new token is still refused after a second"
        time.sleep(0.02)
    assert http.get("/usage", headers=headers).json()["customer_id"] == "cus_t"


# --- connections lent to one-row reads ------------------------------------------------------------


def test_read_connections_are_bounded_reused_replaced_and_closed_on_dispose(db):
    async def run() -> None:
        adb = AsyncDatabase(get_settings().database_url, pool_size=6)
        lender = ReadConnections(adb.engine)
        assert lender.size == 2
        running, peak, seen = 0, 0, set()

        async def statement(driver: object) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            seen.add(id(driver))
            await asyncio.sleep(0.005)
            running -= 1
            return 7

        assert await asyncio.gather(*(lender.run(statement) for _ in range(40))) == [7] * 40
        assert (peak, lender.count, len(seen)) == (2, 2, 2)  # two connections, each reused

        async def broken(_driver: object) -> None:
            raise ConnectionResetError("the server closed the connection")

        with pytest.raises(Unavailable):
            await lender.run(broken)
        assert lender.count == 1  # the failed one is gone; its place is free
        assert await asyncio.gather(*(lender.run(statement) for _ in range(10))) == [7] * 10
        assert lender.count == 2

        async def cancelled_waiter() -> None:
            blocker = asyncio.Event()

            async def hold(_driver: object) -> None:
                await blocker.wait()

            holders = [asyncio.ensure_future(lender.run(hold)) for _ in range(2)]
            await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(lender.run(statement))
            await asyncio.sleep(0.01)
            waiting.cancel()
            blocker.set()
            await asyncio.gather(*holders)
            assert await lender.run(statement) == 7 and lender.count == 2

        await cancelled_waiter()
        await adb.dispose()
        assert lender.count == 0

    asyncio.run(run())
