"""How the ledger refuses. Codes are stable; statuses are the API layer's business."""

from __future__ import annotations

from app.errors import Conflict, InvalidInput, NotFound, Refused


class LedgerError(InvalidInput):
    """An operation the ledger's rules do not allow."""

    code = "ledger_error"


class LedgerRefusal(Refused, LedgerError):
    """A deduction declined by a limit: a decision, recorded as such, not a fault."""


class LimitExceeded(LedgerRefusal):
    code = "limit_exceeded"


class InsufficientCredits(LedgerRefusal):
    code = "insufficient_credits"


class ProviderManaged(Conflict, LedgerError):
    """A write to an entitlement whose ledger a provider keeps."""

    code = "provider_managed"


class UnknownBalance(NotFound, LedgerError):
    code = "not_found"
