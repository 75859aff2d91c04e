"""The one validation layer for what crosses Tally's edges: identifiers, text, instants, amounts.

Types here are pydantic annotated types, so request bodies and provider payloads are validated by
models built from them, and every rule is stated once:
- text must be storable: no NUL character and no lone surrogate (PostgreSQL refuses both, so they
  are refused here, before anything is written);
- an identifier is non-empty text of at most 255 characters (the columns' width);
- instants follow `app.times`; amounts are exact decimals (`app.ledger.amounts`), never floats.

`problem(error)` turns a pydantic ValidationError into one line that names the field, so callers
raise their own domain error with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator, ValidationError
from pydantic_core import ErrorDetails

from app.ledger.amounts import AmountError, parse_decimal
from app.times import from_unix, parse_instant

MAX_ID_LENGTH = 255


def storable(text: str) -> str:
    """Text the database can hold as sent."""
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must not contain lone surrogates (invalid Unicode)") from None
    return text


def _identifier(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return storable(text)


def _decimal(value: Any) -> Decimal:
    try:
        return parse_decimal(value)
    except AmountError as error:
        raise ValueError(str(error)) from None


def _scalar(value: Any) -> str | int | float | bool:
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if isinstance(value, (bool, int, float)):
        return value
    raise ValueError("must be a string, number or boolean")


Text = Annotated[str, Field(strict=True), AfterValidator(storable)]
"""Any storable string; add `Field(max_length=…)` beside it where a column bounds it."""
Identifier = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_LENGTH), AfterValidator(_identifier)]
Instant = Annotated[datetime, PlainValidator(parse_instant)]
"""ISO 8601 text (naive means UTC), by the one rule of `app.times`."""
UnixInstant = Annotated[datetime, PlainValidator(from_unix)]
"""Whole unix seconds (Stripe's timestamps), refused when out of the representable range."""
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
"""An integer stored in an INTEGER column: anything wider would fail in the database, and be retried."""
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""An integer stored in a BIGINT column."""
Amount = Annotated[Decimal, BeforeValidator(_decimal)]
"""A decimal string or integer, exactly; floats are refused (they are already inexact)."""
Scalar = Annotated[str | int | float | bool, PlainValidator(_scalar)]
"""A metadata value: a string, a finite number or a boolean, as JSON gives it."""


MAX_REPORTED = 5

_MESSAGES = {
    "missing": "is required",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "string_too_short": "must be a non-empty string",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
}


def where(loc: tuple[int | str, ...], root: str = "") -> str:
    """`events[3].metadata.tokens` from pydantic's ('events', 3, 'metadata', 'tokens')."""
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path or "the body"


def what(error: ErrorDetails) -> str:
    context: dict[str, Any] = error.get("ctx") or {}
    kind = error["type"]
    if kind == "value_error":  # raised by our own validators: their message is the one to show
        return str(context["error"])
    if kind == "literal_error":
        return f"must be {context['expected']}"
    if kind == "greater_than_equal":
        return f"must be at least {context['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {context['le']}"
    if kind == "string_too_long":
        return f"must be at most {context['max_length']} characters"
    return _MESSAGES.get(kind) or error["msg"]


def describe(errors: Sequence[ErrorDetails], root: str = "") -> str:
    """`where: what` for each problem (the first few), in one line."""
    problems = [f"{where(error['loc'], root)}: {what(error)}" for error in errors[:MAX_REPORTED]]
    if len(errors) > MAX_REPORTED:
        problems.append(f"and {len(errors) - MAX_REPORTED} more")
    return "; ".join(problems)


def problem(error: ValidationError, root: str = "") -> str:
    """A validation error as one line naming each field."""
    return describe(error.errors(include_url=False, include_input=False), root)
