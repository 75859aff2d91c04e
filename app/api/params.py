"""Query parameters, read the one way: whole numbers and instants, refused with a clear 422."""

from __future__ import annotations

import re
from datetime import datetime

from starlette.datastructures import QueryParams

from app.errors import InvalidInput
from app.times import InvalidInstant, parse_instant

MAX_WHOLE = 10**9
"""Past this a page number or size means nothing, and would overflow the database's integers."""
WHOLE = re.compile(r"[+-]?[0-9]{1,12}")


def invalid_parameter(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_parameter")


def whole_param(params: QueryParams, name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not WHOLE.fullmatch(raw.strip()):
        raise invalid_parameter(f"{name} must be a whole number")
    value = int(raw)
    if value < 0:
        raise invalid_parameter(f"{name} must not be negative")
    if value > MAX_WHOLE:
        raise invalid_parameter(f"{name} must be at most {MAX_WHOLE}")
    return value


def instant_param(params: QueryParams, name: str) -> datetime | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return parse_instant(raw)
    except InvalidInstant as error:
        raise invalid_parameter(f"{name} {error}") from None
