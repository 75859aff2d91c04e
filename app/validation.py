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
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator, ValidationError

from app.ledger.amounts import AmountError, parse_decimal
from app.times import InvalidInstant, parse_instant

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


def _instant(value: Any) -> datetime:
    if isinstance(value, datetime):
        return parse_instant(value.isoformat())
    try:
        return parse_instant(value)
    except InvalidInstant as error:
        raise ValueError(str(error)) from None


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
Instant = Annotated[datetime, BeforeValidator(_instant)]
Amount = Annotated[Decimal, BeforeValidator(_decimal)]
"""A decimal string or integer, exactly; floats are refused (they are already inexact)."""
Scalar = Annotated[str | int | float | bool, PlainValidator(_scalar)]
"""A metadata value: a string, a finite number or a boolean, as JSON gives it."""


def location(loc: tuple[int | str, ...], root: str = "") -> str:
    """`events[3].metadata.tokens` from pydantic's ('events', 3, 'metadata', 'tokens')."""
    text = root
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "the body"


def problem(error: ValidationError, root: str = "") -> str:
    """The first problem of a validation error, as one line naming the field."""
    first = error.errors(include_url=False, include_input=False)[0]
    loc = tuple(part for part in first["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{location(loc, root)}: {message}"
