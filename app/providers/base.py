"""What every provider's event handler receives."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from app.catalogue import Catalogue
from app.models import InboxEvent


@dataclass(frozen=True)
class HandlerContext:
    catalogue: Catalogue
    now: datetime


class EventHandler(Protocol):
    def __call__(self, session: Session, event: InboxEvent, payload: dict[str, Any], context: HandlerContext) -> bool:
        """Apply the event inside the caller's transaction; False when Tally has nothing to do for its type."""
        ...
