"""Domain errors at the HTTP edge: one table from a kind of error to its status.

The domain raises `app.errors.TallyError` kinds with stable codes and no status; only this table
knows HTTP. Every error body is `{"code", "message"}`.
"""

from __future__ import annotations

from app.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    Malformed,
    NotFound,
    Refused,
    TallyError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

STATUS_BY_KIND: dict[type, int] = {
    Malformed: 400,
    Refused: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    InvalidInput: 422,
    Unavailable: 503,
}


def status_for(error: TallyError) -> int:
    """The status of the nearest kind the error is; 500 for a TallyError of no known kind."""
    for kind in type(error).__mro__:
        status = STATUS_BY_KIND.get(kind)
        if status is not None:
            return status
    return 500
