"""Errors of the domain: a stable `code` and a message for people, never an HTTP status.

Each domain names its own refusals by subclassing one of the kinds below; the HTTP layer maps a
kind (or a code) to a status in one table (`app.api.errors`), and the command line and the workers
read the same errors without any HTTP baggage.
"""

from __future__ import annotations


class TallyError(Exception):
    """A refusal the caller can act on; `code` is stable, `message` says what to fix."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.message = message
        if code is not None:
            self.code = code
        super().__init__(message)


class InvalidInput(TallyError):
    """The request itself is wrong: a field, a value, a shape."""

    code = "invalid_request"


class Malformed(InvalidInput):
    """The request cannot even be read: not JSON, a header that does not parse, a missing signature."""

    code = "malformed_request"


class TooLarge(InvalidInput):
    """The request is bigger than Tally reads."""

    code = "too_large"


class Refused(TallyError):
    """A well-formed request the ledger declines by its rules (a limit, no credit left)."""

    code = "refused"


class NotFound(TallyError):
    """What the request names does not exist."""

    code = "not_found"


class Conflict(TallyError):
    """The request contradicts what is already recorded."""

    code = "conflict"


class Forbidden(TallyError):
    """The caller may not do this."""

    code = "forbidden"


class Unauthenticated(TallyError):
    """The caller could not be identified."""

    code = "unauthorized"


class Unavailable(TallyError):
    """Tally cannot serve this now (not configured, a dependency down): retry later."""

    code = "unavailable"


class PayloadError(TallyError):
    """An authenticated event whose content cannot be applied: dead-lettered, never retried."""

    code = "malformed_payload"
