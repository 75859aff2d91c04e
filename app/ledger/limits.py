"""The limit rules, stated once: what a deduction may take, and when a limit counts as reached.

Two views of one balance, both answered here:
- the entitlement's (Dodo's seeds 000 and 003): with overage enabled and a limit, the limit is
  reached when overage >= limit; with overage disabled, when nothing is left; unlimited overage
  never reaches a limit;
- the plan period's (`GET /usage`, SPEC 5.2): reached when the period's usage meets the hard cap,
  or uses up the included credits while overage is disabled.
A deduction is refused whole when it would pass the hard cap, need overage that is disabled, or
push overage past its limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class LimitedBalance(Protocol):
    """What the rules read of a balance (the ORM row satisfies it)."""

    balance: int
    overage: int
    overage_enabled: bool
    overage_limit: int | None
    period_used: int
    hard_cap: int | None


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str


def deduction_refusal(balance: LimitedBalance, amount: int) -> Refusal | None:
    """Why a deduction of `amount` atoms must be refused, or None. Pure: reads the locked balance."""
    from_balance = min(amount, balance.balance)
    to_overage = amount - from_balance
    if balance.hard_cap is not None and balance.period_used + amount > balance.hard_cap:
        return Refusal("limit_exceeded", "usage would pass the plan's hard cap for this period")
    if to_overage:
        if not balance.overage_enabled:
            return Refusal("insufficient_credits", "the balance cannot cover this and overage is disabled")
        if balance.overage_limit is not None and balance.overage + to_overage > balance.overage_limit:
            return Refusal("limit_exceeded", "the deduction would push overage past its limit")
    return None


def limit_reached(amount: int, overage: int, *, overage_enabled: bool, overage_limit: int | None) -> bool:
    """The entitlement's view (see the module docstring)."""
    if overage_enabled:
        return overage_limit is not None and overage >= overage_limit
    return amount <= 0


def remaining_headroom(overage: int, *, overage_enabled: bool, overage_limit: int | None) -> int | None:
    """Overage still allowed; None when there is no limit to measure against."""
    if not overage_enabled or overage_limit is None:
        return None
    return max(overage_limit - overage, 0)


def period_limit_reached(used: int, included: int, *, hard_cap: int | None, overage_enabled: bool) -> bool:
    """The plan period's view (see the module docstring)."""
    if hard_cap is not None and used >= hard_cap:
        return True
    return not overage_enabled and included > 0 and used >= included
