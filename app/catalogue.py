"""The plan catalogue: what a Stripe price is worth in credits.

Stripe subscriptions carry no credit amounts, so Tally maps a price (or product, or lookup key) to
an entitlement, the credits included per period and a hard cap (SPEC 5.2). The catalogue comes from
the TOML file named by `TALLY_PLANS`; a price whose metadata carries the same keys describes its own
plan, so teams can manage plans in the Stripe dashboard instead.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

AGGREGATIONS = ("count", "sum", "max", "last")


class CatalogueError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class EntitlementSpec:
    """A Tally-native credit entitlement."""

    id: str
    name: str
    unit: str
    precision: int = 0
    overage_enabled: bool = True
    overage_limit: Decimal | None = None  # None: unlimited overage


@dataclass(frozen=True)
class PlanSpec:
    key: str  # the plan's name, as /usage reports it
    entitlement: str
    unit: str
    included: Decimal
    hard_cap: Decimal | None  # None: "unlimited"
    overage_enabled: bool | None = None  # None: the entitlement decides
    stripe_price: str | None = None
    stripe_product: str | None = None
    lookup_key: str | None = None

    @property
    def overage_limit(self) -> Decimal | None:
        """The overage a period may accrue before the hard cap refuses usage."""
        if self.hard_cap is None:
            return None
        return max(self.hard_cap - self.included, Decimal(0))


@dataclass(frozen=True)
class MeterSpec:
    """A Tally-native meter: which usage events it counts, how, and which entitlement it deducts from.

    `name`, `free_threshold`, `price_per_unit` (major currency units, a decimal) and `currency` only
    describe the meter in the usage history (seed 001); deductions use `units_per_credit`.
    """

    key: str
    event_name: str
    entitlement: str
    aggregation: str = "count"
    metadata_key: str | None = None
    units_per_credit: Decimal = Decimal(1)
    name: str | None = None
    free_threshold: int = 0
    price_per_unit: Decimal = Decimal(0)
    currency: str = "USD"

    @property
    def display_name(self) -> str:
        return self.name or self.key


@dataclass(frozen=True)
class Catalogue:
    entitlements: Mapping[str, EntitlementSpec] = field(default_factory=dict)
    plans: Mapping[str, PlanSpec] = field(default_factory=dict)
    meters: Mapping[str, MeterSpec] = field(default_factory=dict)

    def plan_for(
        self,
        *,
        price_id: str | None = None,
        product_id: str | None = None,
        lookup_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PlanSpec | None:
        """Find the plan of a Stripe price: by price, then product, then lookup key, then metadata."""
        for plan in self.plans.values():
            if price_id and plan.stripe_price == price_id:
                return plan
        for plan in self.plans.values():
            if product_id and plan.stripe_product == product_id:
                return plan
        for plan in self.plans.values():
            if lookup_key and plan.lookup_key == lookup_key:
                return plan
        if metadata and "included" in metadata:
            try:
                return _plan_from_table(str(metadata.get("plan") or price_id or "metadata"), dict(metadata))
            except CatalogueError:
                return None
        return None

    def entitlement_for(self, plan: PlanSpec) -> EntitlementSpec:
        """The plan's entitlement; one named after the unit when the catalogue declares none."""
        declared = self.entitlements.get(plan.entitlement)
        if declared is not None:
            return declared
        return EntitlementSpec(id=plan.entitlement, name=plan.entitlement, unit=plan.unit)


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise CatalogueError([f"{where} must be a number"])
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise CatalogueError([f"{where} must be a number, got {value!r}"]) from None
    if not number.is_finite() or number < 0:
        raise CatalogueError([f"{where} must be a non-negative number, got {value!r}"])
    return number


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise CatalogueError([f"{where} must be true or false, got {value!r}"])


def _plan_from_table(key: str, table: dict[str, Any]) -> PlanSpec:
    where = f"plans.{key}"
    if "included" not in table:
        raise CatalogueError([f"{where}.included is missing"])
    unit = str(table.get("unit") or "credit")
    hard_cap_raw = table.get("hard_cap", "unlimited")
    hard_cap = None if hard_cap_raw == "unlimited" else _decimal(hard_cap_raw, f"{where}.hard_cap")
    included = _decimal(table["included"], f"{where}.included")
    if hard_cap is not None and hard_cap < included:
        raise CatalogueError([f"{where}.hard_cap ({hard_cap}) is below included ({included})"])
    overage = table.get("overage_enabled")
    return PlanSpec(
        key=str(table.get("name") or key),
        entitlement=str(table.get("entitlement") or unit),
        unit=unit,
        included=included,
        hard_cap=hard_cap,
        overage_enabled=None if overage is None else _bool(overage, f"{where}.overage_enabled"),
        stripe_price=table.get("stripe_price"),
        stripe_product=table.get("stripe_product"),
        lookup_key=table.get("lookup_key"),
    )


def parse_catalogue(document: Mapping[str, Any]) -> Catalogue:
    problems: list[str] = []
    entitlements: dict[str, EntitlementSpec] = {}
    for key, table in (document.get("entitlements") or {}).items():
        try:
            precision = table.get("precision", 0)
            if not isinstance(precision, int) or not 0 <= precision <= 10:
                raise CatalogueError([f"entitlements.{key}.precision must be a whole number from 0 to 10"])
            limit = table.get("overage_limit")
            entitlements[key] = EntitlementSpec(
                id=key,
                name=str(table.get("name", key)),
                unit=str(table.get("unit", key)),
                precision=precision,
                overage_enabled=_bool(table.get("overage_enabled", True), f"entitlements.{key}.overage_enabled"),
                overage_limit=None if limit is None else _decimal(limit, f"entitlements.{key}.overage_limit"),
            )
        except CatalogueError as error:
            problems.extend(error.problems)

    plans: dict[str, PlanSpec] = {}
    for key, table in (document.get("plans") or {}).items():
        try:
            plan = _plan_from_table(key, dict(table))
            if not (plan.stripe_price or plan.stripe_product or plan.lookup_key):
                raise CatalogueError([f"plans.{key} needs stripe_price, stripe_product or lookup_key"])
            plans[key] = plan
        except CatalogueError as error:
            problems.extend(error.problems)

    for key, plan in plans.items():
        # Amounts become integer atoms at the entitlement's precision: one finer than that can never apply.
        precision = entitlements[plan.entitlement].precision if plan.entitlement in entitlements else 0
        for name, amount in (("included", plan.included), ("hard_cap", plan.hard_cap)):
            if amount is not None and amount != round(amount, precision):
                problems.append(
                    f"plans.{key}.{name} has more than the {precision} decimal places "
                    f"of entitlement {plan.entitlement!r}"
                )
    for key, spec in entitlements.items():
        if spec.overage_limit is not None and spec.overage_limit != round(spec.overage_limit, spec.precision):
            problems.append(f"entitlements.{key}.overage_limit has more than {spec.precision} decimal places")

    meters: dict[str, MeterSpec] = {}
    for key, table in (document.get("meters") or {}).items():
        aggregation = table.get("aggregation", "count")
        if aggregation not in AGGREGATIONS:
            problems.append(f"meters.{key}.aggregation must be one of {', '.join(AGGREGATIONS)}")
            continue
        if aggregation != "count" and not table.get("key"):
            problems.append(f"meters.{key}.key is needed for aggregation {aggregation!r}")
            continue
        if not table.get("entitlement") or not table.get("event_name"):
            problems.append(f"meters.{key} needs event_name and entitlement")
            continue
        try:
            units_per_credit = _decimal(table.get("units_per_credit", 1), f"meters.{key}.units_per_credit")
            if units_per_credit == 0:
                raise CatalogueError([f"meters.{key}.units_per_credit must be above zero"])
            free_threshold = table.get("free_threshold", 0)
            if isinstance(free_threshold, bool) or not isinstance(free_threshold, int) or free_threshold < 0:
                raise CatalogueError([f"meters.{key}.free_threshold must be a whole number of units, at least 0"])
            price_per_unit = _decimal(table.get("price_per_unit", "0"), f"meters.{key}.price_per_unit")
            currency = str(table.get("currency", "USD"))
            if len(currency) != 3 or not currency.isalpha() or not currency.isupper():
                raise CatalogueError([f"meters.{key}.currency must be a three-letter ISO code such as USD"])
        except CatalogueError as error:
            problems.extend(error.problems)
            continue
        meters[key] = MeterSpec(
            key=key,
            event_name=str(table["event_name"]),
            entitlement=str(table["entitlement"]),
            aggregation=aggregation,
            metadata_key=table.get("key"),
            units_per_credit=units_per_credit,
            name=str(table["name"]) if table.get("name") else None,
            free_threshold=free_threshold,
            price_per_unit=price_per_unit,
            currency=currency,
        )
    if problems:
        raise CatalogueError(problems)
    return Catalogue(entitlements=entitlements, plans=plans, meters=meters)


def load_catalogue(path: Path) -> Catalogue:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogueError([f"{path} does not exist"]) from None
    except tomllib.TOMLDecodeError as error:
        raise CatalogueError([f"{path} is not valid TOML: {error}"]) from None
    return parse_catalogue(document)
