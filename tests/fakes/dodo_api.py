"""A fake Dodo Payments API for reconciliation tests, driven through the official `dodopayments` SDK.

    with DodoFake() as fake:
        calls = fake.add_entitlement("cde_calls", overage_enabled=True, overage_limit="100")
        fake.grant("cus_1", "cde_calls", "1000")
        fake.deduct("cus_1", "cde_calls", "1200")          # 1000 from the balance, 200 to overage
        client = dodopayments.DodoPayments(bearer_token="dodo_test_x", base_url=fake.url, max_retries=0)
        page = client.credit_entitlements.balances.list("cde_calls", page_number=0, page_size=100)

What it models, and why:
- Credit entitlements, a balance per (customer, entitlement) and each balance's ledger, in the
  shapes of the SDK's models (`CreditEntitlement`, `CustomerCreditBalance`, `CreditLedgerEntry`,
  `BalanceListGrantsResponse`, `Subscription`, `SubscriptionListResponse`,
  `SubscriptionRetrieveCreditUsageResponse`); amounts are decimal strings at the entitlement's precision.
- A small model of Dodo's ledger (`add_entry`, `grant`, `deduct`, `expire_grant`, `reset_overage`)
  that computes balance/overage before and after the way Dodo documents it: a deduction takes the
  balance first and the shortfall becomes overage when overage is enabled; balances never go negative.
  `set_balance_without_entry` makes drift that no entry explains. `webhook_payload(entry)` is the
  `credit.*` webhook Dodo would send for an entry.
- Page-number pagination as Dodo does it: `{"items": [...]}`, `page_number` from 0, `page_size`
  at most 100 (default 10), no total. The SDK's auto-pagination asks for page 2 after page 0 (it
  computes `(page_number or 1) + 1`), so it skips page 1: reconciliation must page by hand.
- Errors as `{"code", "message"}` with the HTTP statuses the SDK maps to its exception classes.

Choices where Dodo's behaviour is not documented (each is a constructor option or noted here):
- The ledger lists newest entries first (`ledger_newest_first=True`); pass False for oldest first.
- A deduction that crosses zero is recorded as two entries, `credit_deducted` for what the balance
  covered and `overage_charged` for the shortfall (`crossing_deduction="split"`); "single" records one
  `credit_deducted` that moves both balance and overage.
- `start_date`/`end_date` are inclusive; balances list in the order they were created; subscriptions
  newest first; an invalid `page_size` (outside 1..100) answers 422.
- Under the `carry_deficit_auto_repay` overage behaviour a credit repays overage before it adds to
  the balance (Dodo's cart docs: "credits reduce overage").
"""

from __future__ import annotations

import random
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from ._server import JSON, FakeServer, Request, Response, abort, random_chars

__all__ = ["TRANSACTION_TYPES", "WEBHOOK_TYPES", "DodoFake", "LedgerError"]

TRANSACTION_TYPES = (
    "credit_added",
    "credit_deducted",
    "credit_expired",
    "credit_rolled_over",
    "rollover_forfeited",
    "overage_charged",
    "overage_reset",
    "auto_top_up",
    "manual_adjustment",
    "refund",
)
CREDIT_TYPES = frozenset({"credit_added", "credit_rolled_over", "auto_top_up", "refund", "overage_reset"})
# The `credit.*` webhook of each transaction type (Dodo's webhook list has none for auto_top_up or refund).
WEBHOOK_TYPES = {
    "credit_added": "credit.added",
    "credit_deducted": "credit.deducted",
    "credit_expired": "credit.expired",
    "credit_rolled_over": "credit.rolled_over",
    "rollover_forfeited": "credit.rollover_forfeited",
    "overage_charged": "credit.overage_charged",
    "overage_reset": "credit.overage_reset",
    "manual_adjustment": "credit.manual_adjustment",
}
SUBSCRIPTION_STATUSES = ("pending", "active", "on_hold", "paused", "cancelled", "failed", "expired", "past_due")
OVERAGE_BEHAVIORS = ("forgive_at_reset", "invoice_at_billing", "carry_deficit", "carry_deficit_auto_repay")
Amount = str | int | Decimal


class LedgerError(ValueError):
    """A ledger change Dodo would refuse: a balance below zero, overage disabled, the overage limit reached."""


# -- records ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entitlement:
    id: str
    name: str
    unit: str
    precision: int
    overage_enabled: bool
    overage_limit: Decimal | None
    overage_behavior: str
    rollover_enabled: bool
    price_per_unit: str | None
    currency: str | None
    expires_after_days: int | None
    description: str | None
    created_at: datetime
    updated_at: datetime

    def fmt(self, value: Decimal) -> str:
        """A decimal string at the entitlement's precision, as Dodo renders amounts ("250.00")."""
        return str(value.quantize(Decimal(1).scaleb(-self.precision)))


@dataclass(slots=True)
class _Grant:
    id: str
    customer_id: str
    entitlement_id: str
    initial: Decimal
    remaining: Decimal
    source_type: str
    source_id: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    metadata: dict[str, Any]
    is_expired: bool = False


@dataclass(slots=True)
class _Balance:
    id: str
    customer_id: str
    entitlement_id: str
    balance: Decimal
    overage: Decimal
    created_at: datetime
    updated_at: datetime
    last_transaction_at: datetime | None = None
    entry_keys: list[tuple[datetime, int]] = field(default_factory=list)
    entries: list[JSON] = field(default_factory=list)
    grants: list[_Grant] = field(default_factory=list)


@dataclass(slots=True)
class _Customer:
    id: str
    email: str
    name: str


@dataclass(slots=True)
class _CartLine:
    entitlement_id: str
    credits_amount: Decimal
    low_balance_threshold_percent: int | None = None


@dataclass(slots=True)
class _Subscription:
    id: str
    customer_id: str
    product_id: str
    status: str
    quantity: int
    created_at: datetime
    previous_billing_date: datetime
    next_billing_date: datetime
    interval: str
    interval_count: int
    cart: list[_CartLine]
    metadata: dict[str, Any]
    recurring_pre_tax_amount: int
    cancel_at_next_billing_date: bool = False
    cancelled_at: datetime | None = None
    meters: list[JSON] = field(default_factory=list)
    meter_credit_entitlement_cart: list[JSON] = field(default_factory=list)


# -- the fake --------------------------------------------------------------------------------------


class DodoFake(FakeServer):
    """A fake Dodo Payments API on 127.0.0.1 (see the module docstring).

    `api_key`: when given, only that bearer token is accepted; otherwise any non-empty one.
    `clock`: the provider's "now" (seconds), used for default timestamps.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        business_id: str = "bus_fake",
        brand_id: str = "bra_fake",
        clock: Callable[[], float] = time.time,
        ledger_newest_first: bool = True,
        crossing_deduction: Literal["split", "single"] = "split",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.business_id = business_id
        self.brand_id = brand_id
        self.clock = clock
        self.ledger_newest_first = ledger_newest_first
        self.crossing_deduction = crossing_deduction
        self._rng = random.Random(seed)
        self._ids: set[str] = set()
        self._seq = 0
        self.entitlements: dict[str, _Entitlement] = {}
        self.customers: dict[str, _Customer] = {}
        self.subscriptions: dict[str, _Subscription] = {}
        self._subscription_order: list[_Subscription] = []
        self._balances: dict[tuple[str, str], _Balance] = {}
        self._balances_by_entitlement: dict[str, list[_Balance]] = {}
        self._grants: dict[str, _Grant] = {}

    # -- ids and time ----------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def new_id(self, prefix: str) -> str:
        while True:
            candidate = f"{prefix}_{random_chars(self._rng, 21)}"
            if candidate not in self._ids:
                self._ids.add(candidate)
                return candidate

    # -- seeding: entitlements and customers -----------------------------------------------------

    def add_entitlement(
        self,
        entitlement_id: str | None = None,
        *,
        name: str = "API Calls",
        unit: str = "calls",
        precision: int = 2,
        overage_enabled: bool = False,
        overage_limit: Amount | None = None,
        overage_behavior: str = "forgive_at_reset",
        rollover_enabled: bool = False,
        price_per_unit: str | None = None,
        currency: str | None = None,
        expires_after_days: int | None = None,
        description: str | None = None,
    ) -> JSON:
        """A credit entitlement; `overage_limit=None` with overage enabled means unlimited overage."""
        if overage_behavior not in OVERAGE_BEHAVIORS:
            raise ValueError(f"unknown overage behaviour {overage_behavior!r}")
        if not 0 <= precision <= 10:
            raise ValueError("precision is 0..10")
        with self.lock:
            moment = self.now()
            record = _Entitlement(
                entitlement_id or self.new_id("cde"),
                name,
                unit,
                precision,
                overage_enabled,
                None if overage_limit is None else Decimal(overage_limit),
                overage_behavior,
                rollover_enabled,
                price_per_unit if price_per_unit is not None or not overage_enabled else "1",
                currency if currency is not None or not overage_enabled else "USD",
                expires_after_days,
                description,
                moment,
                moment,
            )
            self._ids.add(record.id)
            self.entitlements[record.id] = record
            self._balances_by_entitlement.setdefault(record.id, [])
            return self.render_entitlement(record)

    def add_customer(
        self, customer_id: str | None = None, *, email: str | None = None, name: str = "Ada Lovelace"
    ) -> JSON:
        with self.lock:
            customer_id = customer_id or self.new_id("cus")
            self.customers[customer_id] = _Customer(customer_id, email or f"{customer_id}@example.com", name)
            return {"customer_id": customer_id, "email": self.customers[customer_id].email, "name": name}

    def _ensure_customer(self, customer_id: str) -> None:
        if customer_id not in self.customers:
            self.add_customer(customer_id)

    # -- seeding: balances and the ledger model --------------------------------------------------

    def balance(self, customer_id: str, entitlement_id: str) -> JSON:
        """The balance as `GET …/balances/{customer_id}` renders it now (created at zero when new)."""
        with self.lock:
            return self.render_balance(self._balance(customer_id, entitlement_id))

    def ledger(self, customer_id: str, entitlement_id: str) -> list[JSON]:
        """Every entry of a balance, oldest first."""
        with self.lock:
            found = self._balances.get((customer_id, entitlement_id))
            return [] if found is None else list(found.entries)

    def add_entry(
        self,
        customer_id: str,
        entitlement_id: str,
        transaction_type: str,
        amount: Amount,
        *,
        is_credit: bool | None = None,
        created_at: datetime | None = None,
        grant_id: str | None = None,
        description: str | None = None,
        reference_type: str | None = None,
        reference_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> JSON:
        """Record one ledger entry and move the balance as Dodo does; returns the entry as the API serves it.

        - credits (`credit_added`, `credit_rolled_over`, `auto_top_up`, `refund`, and `manual_adjustment`
          with `is_credit=True`, the default) add to the balance;
        - `credit_deducted` (and a debit `manual_adjustment`) takes the balance first and puts the
          shortfall on overage, in this one entry; refused when overage is disabled or already at its limit;
        - `credit_expired` and `rollover_forfeited` take from the balance only;
        - `overage_charged` adds to overage, `overage_reset` takes from it; the balance stays flat.
        Grants are not touched: use `grant`/`deduct`/`expire_grant` to keep them in step.
        """
        if transaction_type not in TRANSACTION_TYPES:
            raise ValueError(f"unknown transaction type {transaction_type!r}")
        value = Decimal(amount)
        if value <= 0:
            raise ValueError("a ledger amount is positive; the direction is `is_credit`")
        with self.lock:
            balance = self._balance(customer_id, entitlement_id)
            entitlement = self.entitlements[entitlement_id]
            credit = (
                (is_credit if is_credit is not None else True)
                if transaction_type == "manual_adjustment"
                else transaction_type in CREDIT_TYPES
            )
            funds, overage = balance.balance, balance.overage
            if transaction_type == "overage_charged":
                self._check_overage(entitlement, overage)
                overage += value
            elif transaction_type == "overage_reset":
                if value > overage:
                    raise LedgerError(f"overage reset of {value} exceeds the overage {overage}")
                overage -= value
            elif credit:
                repaid = min(value, overage) if entitlement.overage_behavior == "carry_deficit_auto_repay" else 0
                overage -= repaid
                funds += value - repaid
            elif transaction_type in {"credit_deducted", "manual_adjustment"}:
                taken = min(value, funds)
                shortfall = value - taken
                if shortfall:
                    if not entitlement.overage_enabled:
                        raise LedgerError(f"insufficient balance: {funds} < {value} and overage is disabled")
                    self._check_overage(entitlement, overage)
                funds -= taken
                overage += shortfall
            else:
                if value > funds:
                    raise LedgerError(f"{transaction_type} of {value} exceeds the balance {funds}")
                funds -= value
            moment = created_at or self.now()
            entry: JSON = {
                "id": self.new_id("cle"),
                "amount": entitlement.fmt(value),
                "balance_after": entitlement.fmt(funds),
                "balance_before": entitlement.fmt(balance.balance),
                "brand_id": self.brand_id,
                "business_id": self.business_id,
                "created_at": iso(moment),
                "credit_entitlement_id": entitlement_id,
                "customer_id": customer_id,
                "is_credit": credit,
                "metadata": dict(metadata or {}),
                "overage_after": entitlement.fmt(overage),
                "overage_before": entitlement.fmt(balance.overage),
                "transaction_type": transaction_type,
                "description": description,
                "grant_id": grant_id,
                "reference_id": reference_id,
                "reference_type": reference_type,
            }
            balance.balance, balance.overage = funds, overage
            balance.updated_at = moment
            balance.last_transaction_at = moment
            self._append_entry(balance, moment, entry)
            return {**entry, "metadata": dict(entry["metadata"])}

    def grant(
        self,
        customer_id: str,
        entitlement_id: str,
        amount: Amount,
        *,
        source_type: str = "subscription",
        source_id: str | None = None,
        expires_at: datetime | None = None,
        created_at: datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> JSON:
        """Issue a grant and its `credit_added` entry (what a subscription cycle, top-up or API credit does)."""
        with self.lock:
            moment = created_at or self.now()
            entitlement = self.entitlements[entitlement_id]
            if expires_at is None and entitlement.expires_after_days is not None:
                expires_at = datetime.fromtimestamp(moment.timestamp() + entitlement.expires_after_days * 86400, UTC)
            value = Decimal(amount)
            record = _Grant(
                self.new_id("cgr"),
                customer_id,
                entitlement_id,
                value,
                value,
                source_type,
                source_id,
                moment,
                moment,
                expires_at,
                dict(metadata or {}),
            )
            balance = self._balance(customer_id, entitlement_id)
            repaid = min(value, balance.overage) if entitlement.overage_behavior == "carry_deficit_auto_repay" else 0
            record.remaining = value - Decimal(repaid)
            balance.grants.append(record)
            self._grants[record.id] = record
            return self.add_entry(
                customer_id,
                entitlement_id,
                "credit_added",
                value,
                created_at=moment,
                grant_id=record.id,
                reference_type=source_type,
                reference_id=source_id,
                metadata=metadata,
            )

    def deduct(
        self,
        customer_id: str,
        entitlement_id: str,
        amount: Amount,
        *,
        created_at: datetime | None = None,
        description: str | None = None,
        reference_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> list[JSON]:
        """Usage as Dodo applies it: oldest grants first, then overage when enabled; the entries made.

        Crossing zero makes two entries (`credit_deducted`, `overage_charged`) or one, by
        `crossing_deduction`. Without overage the deduction stops at zero (the rest is not recorded);
        with overage at its limit the shortfall is refused (`LedgerError`).
        """
        value = Decimal(amount)
        with self.lock:
            balance = self._balance(customer_id, entitlement_id)
            entitlement = self.entitlements[entitlement_id]
            covered = min(value, balance.balance)
            shortfall = value - covered if entitlement.overage_enabled else Decimal(0)
            if shortfall:
                self._check_overage(entitlement, balance.overage)
            first_grant = self._consume_grants(balance, covered)
            common: dict[str, Any] = {
                "created_at": created_at,
                "description": description,
                "reference_type": "meter" if reference_id else None,
                "reference_id": reference_id,
                "metadata": metadata,
            }
            entries: list[JSON] = []
            if self.crossing_deduction == "single" and covered + shortfall > 0:
                return [
                    self.add_entry(
                        customer_id,
                        entitlement_id,
                        "credit_deducted",
                        covered + shortfall,
                        grant_id=first_grant,
                        **common,
                    )
                ]
            if covered > 0:
                entries.append(
                    self.add_entry(
                        customer_id, entitlement_id, "credit_deducted", covered, grant_id=first_grant, **common
                    )
                )
            if shortfall > 0:
                entries.append(self.add_entry(customer_id, entitlement_id, "overage_charged", shortfall, **common))
            return entries

    def expire_grant(self, grant_id: str, *, created_at: datetime | None = None) -> JSON | None:
        """The grant's remainder expires (`credit_expired`); None when nothing remained."""
        with self.lock:
            record = self._grants[grant_id]
            remaining, record.remaining = record.remaining, Decimal(0)
            record.is_expired = True
            record.updated_at = created_at or self.now()
            if remaining <= 0:
                return None
            return self.add_entry(
                record.customer_id,
                record.entitlement_id,
                "credit_expired",
                remaining,
                created_at=created_at,
                grant_id=grant_id,
            )

    def reset_overage(
        self, customer_id: str, entitlement_id: str, *, created_at: datetime | None = None
    ) -> JSON | None:
        """The overage goes back to zero at a cycle end (`overage_reset`); None when there was none."""
        with self.lock:
            overage = self._balance(customer_id, entitlement_id).overage
            if overage <= 0:
                return None
            return self.add_entry(customer_id, entitlement_id, "overage_reset", overage, created_at=created_at)

    def set_balance_without_entry(
        self, customer_id: str, entitlement_id: str, *, balance: Amount | None = None, overage: Amount | None = None
    ) -> JSON:
        """Drift: change the balance (or overage) with no ledger entry that explains it."""
        with self.lock:
            record = self._balance(customer_id, entitlement_id)
            if balance is not None:
                record.balance = Decimal(balance)
            if overage is not None:
                record.overage = Decimal(overage)
            record.updated_at = self.now()
            return self.render_balance(record)

    def seed_balances(
        self, entitlement_id: str, n: int, *, balance: Amount = "100", with_entries: bool = False
    ) -> list[str]:
        """`n` customers with a balance on `entitlement_id` (customer ids returned, in list order).

        Without entries (the default) each balance is just set, which is fast for 50,000; with
        entries each one comes from a grant, so the ledger explains it.
        """
        value = Decimal(balance)
        with self.lock:
            moment = self.now()
            customers = [f"cus_seed{index:07d}" for index in range(n)]
            for customer_id in customers:
                if with_entries:
                    self.grant(customer_id, entitlement_id, value, created_at=moment)
                else:
                    self._balance(customer_id, entitlement_id, moment).balance = value
            return customers

    def _check_overage(self, entitlement: _Entitlement, overage: Decimal) -> None:
        if not entitlement.overage_enabled:
            raise LedgerError("overage is disabled for this entitlement")
        if entitlement.overage_limit is not None and overage >= entitlement.overage_limit:
            raise LedgerError(f"overage limit reached ({overage} >= {entitlement.overage_limit})")

    def _consume_grants(self, balance: _Balance, amount: Decimal) -> str | None:
        """Take `amount` from the oldest unexpired grants; the first grant touched (the entry's `grant_id`)."""
        first = None
        for record in sorted(balance.grants, key=lambda grant: grant.created_at):
            if amount <= 0:
                break
            if record.is_expired or record.remaining <= 0:
                continue
            taken = min(record.remaining, amount)
            record.remaining -= taken
            record.updated_at = self.now()
            amount -= taken
            first = first or record.id
        return first

    def _balance(self, customer_id: str, entitlement_id: str, moment: datetime | None = None) -> _Balance:
        if entitlement_id not in self.entitlements:
            raise KeyError(f"no credit entitlement {entitlement_id}")
        found = self._balances.get((customer_id, entitlement_id))
        if found is None:
            moment = moment or self.now()
            self._ensure_customer(customer_id)
            found = _Balance(self.new_id("ccb"), customer_id, entitlement_id, Decimal(0), Decimal(0), moment, moment)
            self._balances[(customer_id, entitlement_id)] = found
            self._balances_by_entitlement[entitlement_id].append(found)
        return found

    def _append_entry(self, balance: _Balance, moment: datetime, entry: JSON) -> None:
        key = (moment, self._seq)
        self._seq += 1
        if not balance.entry_keys or key > balance.entry_keys[-1]:
            balance.entry_keys.append(key)
            balance.entries.append(entry)
        else:
            at = bisect_left(balance.entry_keys, key)
            balance.entry_keys.insert(at, key)
            balance.entries.insert(at, entry)

    # -- seeding: subscriptions ------------------------------------------------------------------

    def add_subscription(
        self,
        customer_id: str | None = None,
        *,
        subscription_id: str | None = None,
        product_id: str = "pdt_fake",
        status: str = "active",
        cart: Sequence[tuple[str, Amount]] = (),
        quantity: int = 1,
        previous_billing_date: datetime | None = None,
        next_billing_date: datetime | None = None,
        interval: str = "Month",
        interval_count: int = 1,
        cancel_at_next_billing_date: bool = False,
        metadata: dict[str, Any] | None = None,
        recurring_pre_tax_amount: int = 1000,
        grant: bool = True,
        meters: Sequence[JSON] = (),
        meter_credit_entitlement_cart: Sequence[JSON] = (),
    ) -> JSON:
        """A subscription whose `cart` lists (entitlement id, credits per period); returns it as retrieved.

        With `grant=True` (default) each cart line's credits are granted for the current period, so
        the ledger explains the balances from the start.
        """
        if status not in SUBSCRIPTION_STATUSES:
            raise ValueError(f"unknown subscription status {status!r}")
        with self.lock:
            start = previous_billing_date or self.now()
            record = _Subscription(
                subscription_id or self.new_id("sub"),
                customer_id or self.new_id("cus"),
                product_id,
                status,
                quantity,
                start,
                start,
                next_billing_date or add_period(start, interval, interval_count),
                interval,
                interval_count,
                [_CartLine(ce, Decimal(amount)) for ce, amount in cart],
                dict(metadata or {}),
                recurring_pre_tax_amount,
                cancel_at_next_billing_date,
                meters=[dict(meter) for meter in meters],
                meter_credit_entitlement_cart=[dict(line) for line in meter_credit_entitlement_cart],
            )
            for line in record.cart:
                if line.entitlement_id not in self.entitlements:
                    raise KeyError(f"no credit entitlement {line.entitlement_id}")
            self._ensure_customer(record.customer_id)
            self._ids.add(record.id)
            self.subscriptions[record.id] = record
            self._subscription_order.append(record)
            if grant:
                for line in record.cart:
                    self.grant(
                        record.customer_id,
                        line.entitlement_id,
                        line.credits_amount,
                        source_id=record.id,
                        created_at=start,
                    )
            return self.render_subscription(record)

    def subscription(self, subscription_id: str) -> JSON:
        with self.lock:
            return self.render_subscription(self.subscriptions[subscription_id])

    def update_subscription(
        self,
        subscription_id: str,
        *,
        status: str | None = None,
        quantity: int | None = None,
        product_id: str | None = None,
        cancel_at_next_billing_date: bool | None = None,
        cancelled_at: datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> JSON:
        """Change fields in place (a status change, a scheduled cancel); returns the subscription as retrieved."""
        with self.lock:
            record = self.subscriptions[subscription_id]
            if status is not None:
                if status not in SUBSCRIPTION_STATUSES:
                    raise ValueError(f"unknown subscription status {status!r}")
                record.status = status
                if status == "cancelled" and record.cancelled_at is None:
                    record.cancelled_at = cancelled_at or self.now()
            if cancelled_at is not None:
                record.cancelled_at = cancelled_at
            if quantity is not None:
                record.quantity = quantity
            if product_id is not None:
                record.product_id = product_id
            if cancel_at_next_billing_date is not None:
                record.cancel_at_next_billing_date = cancel_at_next_billing_date
            if metadata is not None:
                record.metadata = dict(metadata)
            return self.render_subscription(record)

    def renew_subscription(self, subscription_id: str) -> list[JSON]:
        """Move into the next period as a paid renewal: per cart line the old grants' remainder expires,
        the overage resets (unless the behaviour carries the deficit), and the period's credits are
        granted. Returns the ledger entries made, in order."""
        with self.lock:
            record = self.subscriptions[subscription_id]
            if record.status in {"cancelled", "expired", "failed"}:
                raise ValueError(f"subscription {subscription_id} has ended ({record.status})")
            moment = record.next_billing_date
            record.previous_billing_date = moment
            record.next_billing_date = add_period(moment, record.interval, record.interval_count)
            entries: list[JSON] = []
            for line in record.cart:
                balance = self._balance(record.customer_id, line.entitlement_id)
                for old in list(balance.grants):
                    if old.source_id == record.id and not old.is_expired:
                        expired = self.expire_grant(old.id, created_at=moment)
                        if expired is not None:
                            entries.append(expired)
                if self.entitlements[line.entitlement_id].overage_behavior in {
                    "forgive_at_reset",
                    "invoice_at_billing",
                }:
                    reset = self.reset_overage(record.customer_id, line.entitlement_id, created_at=moment)
                    if reset is not None:
                        entries.append(reset)
                entries.append(
                    self.grant(
                        record.customer_id,
                        line.entitlement_id,
                        line.credits_amount,
                        source_id=record.id,
                        created_at=moment,
                    )
                )
            return entries

    # -- webhooks --------------------------------------------------------------------------------

    def webhook_payload(self, entry: JSON, *, timestamp: datetime | None = None) -> JSON:
        """The `credit.*` webhook Dodo sends for a ledger entry: the entry is the event's `data`."""
        event_type = WEBHOOK_TYPES.get(entry["transaction_type"])
        if event_type is None:
            raise ValueError(f"Dodo documents no webhook for {entry['transaction_type']} entries")
        return {
            "business_id": self.business_id,
            "type": event_type,
            "timestamp": iso(timestamp or self.now()),
            "data": dict(entry),
        }

    def subscription_webhook_payload(
        self, subscription_id: str, event_type: str | None = None, *, timestamp: datetime | None = None
    ) -> JSON:
        """A `subscription.*` webhook carrying the subscription as it is now (Dodo sends the latest state)."""
        with self.lock:
            record = self.subscriptions[subscription_id]
            data = {"payload_type": "Subscription", **self.render_subscription(record)}
            return {
                "business_id": self.business_id,
                "type": event_type or f"subscription.{record.status}",
                "timestamp": iso(timestamp or self.now()),
                "data": data,
            }

    # -- rendering -------------------------------------------------------------------------------

    def render_entitlement(self, record: _Entitlement) -> JSON:
        return {
            "id": record.id,
            "business_id": self.business_id,
            "created_at": iso(record.created_at),
            "name": record.name,
            "overage_behavior": record.overage_behavior,
            "overage_enabled": record.overage_enabled,
            "precision": record.precision,
            "rollover_enabled": record.rollover_enabled,
            "unit": record.unit,
            "updated_at": iso(record.updated_at),
            "currency": record.currency,
            "description": record.description,
            "expires_after_days": record.expires_after_days,
            "max_rollover_count": None,
            "overage_limit": None if record.overage_limit is None else int(record.overage_limit),
            "price_per_unit": record.price_per_unit,
            "rollover_percentage": None,
            "rollover_timeframe_count": None,
            "rollover_timeframe_interval": None,
        }

    def render_balance(self, record: _Balance) -> JSON:
        entitlement = self.entitlements[record.entitlement_id]
        return {
            "id": record.id,
            "balance": entitlement.fmt(record.balance),
            "created_at": iso(record.created_at),
            "credit_entitlement_id": record.entitlement_id,
            "customer_id": record.customer_id,
            "overage": entitlement.fmt(record.overage),
            "updated_at": iso(record.updated_at),
            "last_transaction_at": None if record.last_transaction_at is None else iso(record.last_transaction_at),
        }

    def render_grant(self, record: _Grant) -> JSON:
        entitlement = self.entitlements[record.entitlement_id]
        return {
            "id": record.id,
            "created_at": iso(record.created_at),
            "credit_entitlement_id": record.entitlement_id,
            "customer_id": record.customer_id,
            "initial_amount": entitlement.fmt(record.initial),
            "is_expired": record.is_expired,
            "is_rolled_over": False,
            "remaining_amount": entitlement.fmt(record.remaining),
            "rollover_count": 0,
            "source_type": record.source_type,
            "updated_at": iso(record.updated_at),
            "expires_at": None if record.expires_at is None else iso(record.expires_at),
            "metadata": dict(record.metadata),
            "parent_grant_id": None,
            "source_id": record.source_id,
        }

    def _cart_line(self, record: _Subscription, line: _CartLine) -> JSON:
        entitlement = self.entitlements[line.entitlement_id]
        balance = self._balances.get((record.customer_id, line.entitlement_id))
        return {
            "credit_entitlement_id": entitlement.id,
            "credit_entitlement_name": entitlement.name,
            "credits_amount": entitlement.fmt(line.credits_amount),
            "overage_balance": entitlement.fmt(balance.overage if balance else Decimal(0)),
            "overage_behavior": entitlement.overage_behavior,
            "overage_enabled": entitlement.overage_enabled,
            "product_id": record.product_id,
            "remaining_balance": entitlement.fmt(balance.balance if balance else Decimal(0)),
            "rollover_enabled": entitlement.rollover_enabled,
            "unit": entitlement.unit,
            "expires_after_days": entitlement.expires_after_days,
            "low_balance_threshold_percent": line.low_balance_threshold_percent,
            "max_rollover_count": None,
            "overage_limit": None if entitlement.overage_limit is None else entitlement.fmt(entitlement.overage_limit),
            "rollover_percentage": None,
            "rollover_timeframe_count": None,
            "rollover_timeframe_interval": None,
        }

    def _subscription_common(self, record: _Subscription) -> JSON:
        customer = self.customers[record.customer_id]
        return {
            "billing": {"country": "US", "city": None, "state": None, "street": None, "zipcode": None},
            "brand_id": self.brand_id,
            "cancel_at_next_billing_date": record.cancel_at_next_billing_date,
            "created_at": iso(record.created_at),
            "currency": "USD",
            "customer": {
                "customer_id": customer.id,
                "email": customer.email,
                "name": customer.name,
                "metadata": {},
                "phone_number": None,
            },
            "has_payment_method": True,
            "metadata": dict(record.metadata),
            "next_billing_date": iso(record.next_billing_date),
            "on_demand": False,
            "payment_frequency_count": record.interval_count,
            "payment_frequency_interval": record.interval,
            "previous_billing_date": iso(record.previous_billing_date),
            "product_id": record.product_id,
            "quantity": record.quantity,
            "recurring_pre_tax_amount": record.recurring_pre_tax_amount,
            "status": record.status,
            "subscription_id": record.id,
            "subscription_period_count": 10,
            "subscription_period_interval": "Year",
            "tax_inclusive": False,
            "trial_period_days": 0,
            "cancelled_at": None if record.cancelled_at is None else iso(record.cancelled_at),
            "cancelled_by": None,
            "customer_business_name": None,
            "discount_cycles_remaining": None,
            "discount_id": None,
            "paused_at": None,
            "payment_method_id": None,
            "scheduled_change": None,
            "tax_id": None,
            "trial_amount": None,
        }

    def render_subscription(self, record: _Subscription) -> JSON:
        """The subscription as `GET /subscriptions/{id}` (and a `subscription.*` webhook) renders it."""
        return {
            **self._subscription_common(record),
            "addons": [],
            "credit_entitlement_cart": [self._cart_line(record, line) for line in record.cart],
            "meter_credit_entitlement_cart": [dict(line) for line in record.meter_credit_entitlement_cart],
            "meters": [dict(meter) for meter in record.meters],
            "cancellation_comment": None,
            "cancellation_feedback": None,
            "custom_field_responses": None,
            "discounts": [],
            "expires_at": None,
        }

    def render_subscription_list_item(self, record: _Subscription) -> JSON:
        """A `GET /subscriptions` item (`SubscriptionListResponse`: no carts, lightweight discounts)."""
        return {**self._subscription_common(record), "discounts": [], "product_name": None}

    def credit_usage(self, record: _Subscription) -> JSON:
        items = []
        for line in record.cart:
            entitlement = self.entitlements[line.entitlement_id]
            balance = self._balances.get((record.customer_id, line.entitlement_id))
            overage = balance.overage if balance else Decimal(0)
            limit = entitlement.overage_limit if entitlement.overage_enabled else None
            items.append(
                {
                    "balance": entitlement.fmt(balance.balance if balance else Decimal(0)),
                    "credit_entitlement_id": entitlement.id,
                    "credit_entitlement_name": entitlement.name,
                    "limit_reached": limit is not None and overage >= limit,
                    "overage": entitlement.fmt(overage),
                    "overage_enabled": entitlement.overage_enabled,
                    "unit": entitlement.unit,
                    "overage_limit": None if limit is None else entitlement.fmt(limit),
                    "remaining_headroom": None if limit is None else entitlement.fmt(max(limit - overage, Decimal(0))),
                }
            )
        return {"items": items, "subscription_id": record.id}

    # -- the API ---------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> Response | None:
        header = request.header("authorization") or ""
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not token or (self.api_key is not None and token != self.api_key):
            return self.error(401, "Invalid or missing API key", code="UNAUTHORIZED")
        return None

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> Response:
        default = {
            400: "BAD_REQUEST",
            401: "UNAUTHORIZED",
            404: "NOT_FOUND",
            409: "CONFLICT",
            422: "UNPROCESSABLE_ENTITY",
            429: "TOO_MANY_REQUESTS",
        }.get(status, "INTERNAL_SERVER_ERROR")
        return Response(status, {"code": code or default, "message": message})

    def fault_response(self, status: int) -> Response:
        if status == 429:
            return self.error(429, "Too many requests, please retry later")
        if status >= 500:
            return self.error(status, "Internal server error")
        return self.error(status, f"Injected HTTP {status}")

    def route(self, request: Request) -> Response:
        if request.method != "GET":
            return self.error(405, f"The fake serves GET only ({request.method} {request.path})")
        params = dict(request.query)
        parts = request.path.strip("/").split("/")
        if parts[0] == "credit-entitlements":
            return self._route_entitlements(parts[1:], params)
        if parts[0] == "subscriptions":
            if len(parts) == 1:
                return self._list_subscriptions(params)
            record = self.subscriptions.get(parts[1])
            if record is None:
                raise abort(self.error(404, f"Subscription {parts[1]} not found"))
            if len(parts) == 2:
                return Response(200, self.render_subscription(record))
            if parts[2:] == ["credit-usage"]:
                return Response(200, self.credit_usage(record))
        return self.error(404, f"No route for GET {request.path}")

    def _route_entitlements(self, parts: list[str], params: dict[str, str]) -> Response:
        if not parts:
            listed = list(self.entitlements.values()) if params.get("deleted") != "true" else []
            return self._page([self.render_entitlement(record) for record in listed], params)
        entitlement = self.entitlements.get(parts[0])
        if entitlement is None:
            raise abort(self.error(404, f"Credit entitlement {parts[0]} not found"))
        if len(parts) == 1:
            return Response(200, self.render_entitlement(entitlement))
        if parts[1] != "balances":
            return self.error(404, f"No route for GET /credit-entitlements/{'/'.join(parts)}")
        if len(parts) == 2:
            balances = self._balances_by_entitlement[entitlement.id]
            customer_id = params.get("customer_id")
            if customer_id is not None:
                found = self._balances.get((customer_id, entitlement.id))
                balances = [found] if found is not None else []
            number, size = self._paging(params)
            return Response(
                200,
                {"items": [self.render_balance(record) for record in balances[number * size : (number + 1) * size]]},
            )
        balance = self._balances.get((parts[2], entitlement.id))
        if len(parts) == 3:
            if balance is None:
                raise abort(self.error(404, f"No balance for customer {parts[2]} on {entitlement.id}"))
            return Response(200, self.render_balance(balance))
        if parts[3:] == ["ledger"]:
            return self._ledger_page(balance, params)
        if parts[3:] == ["grants"]:
            grants = balance.grants if balance is not None else []
            status = params.get("status")
            if status not in (None, "active", "expired", "depleted"):
                raise abort(self.error(422, f"Invalid status {status}"))
            selected = [record for record in grants if status is None or _grant_status(record) == status]
            return self._page([self.render_grant(record) for record in selected], params)
        return self.error(404, f"No route for GET /credit-entitlements/{'/'.join(parts)}")

    def _ledger_page(self, balance: _Balance | None, params: dict[str, str]) -> Response:
        number, size = self._paging(params)
        if balance is None:
            return Response(200, {"items": []})
        start, end = (self._date(params, name) for name in ("start_date", "end_date"))
        keys = balance.entry_keys
        lo = 0 if start is None else bisect_left(keys, (start, -1))
        hi = len(keys) if end is None else bisect_right(keys, (end, self._seq))
        wanted = params.get("transaction_type")
        indices: Iterable[int] = range(hi - 1, lo - 1, -1) if self.ledger_newest_first else range(lo, hi)
        skip, items = number * size, []
        for index in indices:
            entry = balance.entries[index]
            if wanted is not None and entry["transaction_type"] != wanted:
                continue
            if skip:
                skip -= 1
                continue
            items.append(entry)
            if len(items) == size:
                break
        return Response(200, {"items": items})

    def _list_subscriptions(self, params: dict[str, str]) -> Response:
        number, size = self._paging(params)
        after, before = self._date(params, "created_at_gte"), self._date(params, "created_at_lte")
        status, customer_id = params.get("status"), params.get("customer_id")
        product_id, brand_id = params.get("product_id"), params.get("brand_id")
        cancel_flag = params.get("cancel_at_next_billing_date")
        if status is not None and status not in SUBSCRIPTION_STATUSES:
            raise abort(self.error(422, f"Invalid status {status}"))

        def match(record: _Subscription) -> bool:
            return (
                (status is None or record.status == status)
                and (customer_id is None or record.customer_id == customer_id)
                and (product_id is None or record.product_id == product_id)
                and (brand_id is None or brand_id == self.brand_id)
                and (cancel_flag is None or str(record.cancel_at_next_billing_date).lower() == cancel_flag)
                and (after is None or record.created_at >= after)
                and (before is None or record.created_at <= before)
            )

        skip, items = number * size, []
        for record in reversed(self._subscription_order):
            if not match(record):
                continue
            if skip:
                skip -= 1
                continue
            items.append(self.render_subscription_list_item(record))
            if len(items) == size:
                break
        return Response(200, {"items": items})

    def _page(self, rendered: list[JSON], params: dict[str, str]) -> Response:
        number, size = self._paging(params)
        return Response(200, {"items": rendered[number * size : (number + 1) * size]})

    def _paging(self, params: dict[str, str]) -> tuple[int, int]:
        try:
            number = int(params.get("page_number", "0"))
            size = int(params.get("page_size", "10"))
        except ValueError:
            raise abort(self.error(422, "page_number and page_size are integers")) from None
        if number < 0:
            raise abort(self.error(422, "page_number starts at 0"))
        if not 1 <= size <= 100:
            raise abort(self.error(422, "page_size must be between 1 and 100"))
        return number, size

    def _date(self, params: dict[str, str], name: str) -> datetime | None:
        raw = params.get(name)
        if raw is None:
            return None
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            raise abort(self.error(422, f"{name} is not an ISO 8601 date-time: {raw}")) from None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# -- helpers -------------------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """Dodo's timestamp format: UTC, microseconds, `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def add_period(moment: datetime, interval: str, count: int = 1) -> datetime:
    """`moment` plus `count` Day/Week/Month/Year, by the calendar (a month from Jan 31 is Feb 28/29)."""
    if interval == "Day":
        return datetime.fromtimestamp(moment.timestamp() + 86400 * count, UTC)
    if interval == "Week":
        return datetime.fromtimestamp(moment.timestamp() + 7 * 86400 * count, UTC)
    if interval not in {"Month", "Year"}:
        raise ValueError(f"unknown interval {interval!r}")
    months = count * (12 if interval == "Year" else 1)
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    days = (datetime(year + month // 12, month % 12 + 1, 1) - datetime(year, month, 1)).days
    return moment.replace(year=year, month=month, day=min(moment.day, days))


def _grant_status(record: _Grant) -> str:
    if record.is_expired:
        return "expired"
    return "active" if record.remaining > 0 else "depleted"
