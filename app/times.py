"""Instants: the one parser and the one renderer of times that cross Tally's edges.

Inside Tally every instant is an aware `datetime` in UTC. The rule for input, stated once:

- ISO 8601 / RFC 3339 text (`2026-03-01T10:00:00Z`, `…+02:00`, a date alone means its midnight);
- text without an offset is taken as UTC: providers and clients that omit it mean UTC, and the
  server's local zone would be meaningless to them;
- more than six fractional digits (Dodo sends nanoseconds) are cut to microseconds;
- a time that leaves the representable range once its offset is applied is refused, never an error
  deeper down.

Output is RFC 3339 in UTC with a trailing `Z`: whole seconds, plus the fraction only when the
instant has one (provider ledger times do; Stripe's and billing periods do not).
"""

from __future__ import annotations

from datetime import UTC, datetime


class InvalidInstant(ValueError):
    """Text or a number that is not an instant Tally can hold."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_instant(value: object) -> datetime:
    """An aware UTC datetime from ISO 8601 text, by the rule in the module docstring."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInstant("must be an ISO 8601 date-time")
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    head, dot, rest = text.partition(".")
    if dot:  # Python reads at most 6 fractional digits
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInstant(f"{value!r} is not an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise InvalidInstant(f"{value!r} is outside the supported range of dates") from None


def from_unix(seconds: object) -> datetime:
    """An aware UTC datetime from whole unix seconds (Stripe's timestamps)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise InvalidInstant("must be a unix timestamp in whole seconds")
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidInstant(f"{seconds} is outside the supported range of dates") from None


def render_instant(moment: datetime) -> str:
    """RFC 3339 in UTC with a trailing Z; the fraction only when there is one."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"


def render_optional(moment: datetime | None) -> str | None:
    return None if moment is None else render_instant(moment)
