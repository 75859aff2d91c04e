"""Ordering object snapshots that providers deliver out of order.

Each stored object keeps the watermark of the snapshot applied last. An incoming snapshot replaces it
only when it is newer: a later provider timestamp wins; within one second (Stripe's resolution) the
event's own record of what it changed from decides (a snapshot whose changed-from values equal the
stored state came after it), then lifecycle order (a terminal status outlives every other, a
`deleted` event outlives an `updated`, which outlives a `created`), then the later period. Anything
still tied keeps the stored state: the nightly reconciliation asks the provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATUSES = frozenset({"canceled", "cancelled", "incomplete_expired", "expired", "failed"})


@dataclass(frozen=True)
class Watermark:
    at: int  # provider time, whole seconds
    rank: int  # lifecycle order of the event type within one second
    event_id: str
    previous: dict[str, Any] | None = None  # normalised fields this event changed from


@dataclass(frozen=True)
class SnapshotState:
    """The fields of a snapshot that ordering compares, normalised across providers to JSON values
    (times as epoch seconds) so that a stored watermark compares equal to a fresh snapshot."""

    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str | None:
        return self.fields.get("status")

    @property
    def period_end(self) -> int | None:
        return self.fields.get("current_period_end")


def _describes(changed_from: dict[str, Any] | None, state: dict[str, Any]) -> bool:
    """True when every changed-from value equals `state`: the event changed *from* that state."""
    if not changed_from:
        return False
    comparable = {key: value for key, value in changed_from.items() if key in state}
    return bool(comparable) and all(state[key] == value for key, value in comparable.items())


def is_newer(
    incoming: Watermark,
    incoming_state: SnapshotState,
    stored: Watermark | None,
    stored_state: SnapshotState,
) -> bool:
    """Should the incoming snapshot replace the stored one?"""
    if stored is None:
        return True
    if incoming.event_id == stored.event_id:
        return False
    if incoming.at != stored.at:
        return incoming.at > stored.at
    if _describes(incoming.previous, stored_state.fields):
        return True
    if _describes(stored.previous, incoming_state.fields):
        return False
    incoming_terminal = incoming_state.status in TERMINAL_STATUSES
    stored_terminal = stored_state.status in TERMINAL_STATUSES
    if incoming_terminal != stored_terminal:
        return incoming_terminal
    if incoming.rank != stored.rank:
        return incoming.rank > stored.rank
    if incoming_state.period_end and stored_state.period_end and incoming_state.period_end != stored_state.period_end:
        return incoming_state.period_end > stored_state.period_end
    return False
