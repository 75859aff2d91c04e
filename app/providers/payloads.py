"""Provider payloads validated by pydantic, and their shape errors as PayloadError.

A webhook's JSON is parsed once upstream. Each provider describes every object it reads as a
TypedDict of the fields Tally relies on, validated by pydantic through a TypeAdapter built once at
import; `validate` is the one place where a pydantic ValidationError becomes a PayloadError naming the
field (`data.object.items.data[0].price: must be an object`). So an authenticated but malformed event
is dead-lettered at once instead of failing deeper down with an AttributeError or OverflowError and
being retried for minutes.

Validation is strict (a field takes only its own JSON type: no "1" for 1, no 1 for true, no 1.0 for
1), because providers send JSON types faithfully and a coercion would hide a payload Tally misreads;
fields a provider adds are ignored. TypedDicts rather than BaseModels because validation runs on the
workers' hot path and a model instance costs about four times a dict, with up to a dozen nested
objects per event (`bench/payloads.py`); the parse functions turn them into frozen values at once.

The field types shared by both providers live here too: instants through `app.times`, integers
bounded by the columns that store them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from app.errors import PayloadError
from app.times import from_unix, parse_instant

T = TypeVar("T")

NonEmptyStr = Annotated[str, Field(min_length=1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
"""An integer stored in an INTEGER column: anything wider would fail in the database, and be retried."""
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""An integer stored in a BIGINT column."""
Instant = Annotated[datetime, PlainValidator(parse_instant)]
"""ISO 8601 text (naive means UTC), by the one rule of `app.times`."""
UnixInstant = Annotated[datetime, PlainValidator(from_unix)]
"""Whole unix seconds (Stripe's timestamps), refused when out of the representable range."""


def _empty_dict_if_falsy(value: object) -> object:
    return value if value else {}


JsonObject = Annotated[dict[str, Any], BeforeValidator(_empty_dict_if_falsy)]
"""Free-form JSON such as metadata; null (or another empty value) reads as {}."""


def one_of(allowed: Collection[str], what: str) -> AfterValidator:
    """A string from a known set; anything else is `unknown <what> '<value>'`."""

    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}")
        return value

    return AfterValidator(check)


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


def validate(shape: TypeAdapter[T], value: object) -> T:
    """Already-parsed JSON read as `shape`, strictly; any shape error is a PayloadError.

    Calls the adapter's core validator directly: `TypeAdapter.validate_python` adds about 0.4 µs a
    call around it, and every shape here is complete when its adapter is built."""
    try:
        result: T = shape.validator.validate_python(value, strict=True)
        return result
    except ValidationError as error:
        raise PayloadError(describe(error.errors(include_url=False, include_input=False))) from None


def describe(errors: Sequence[ErrorDetails]) -> str:
    """`where: what` for each problem (the first few), where is a JSON path from the event's root."""
    problems = [f"{_where(error['loc'])}: {_what(error)}" for error in errors[:MAX_REPORTED]]
    if len(errors) > MAX_REPORTED:
        problems.append(f"and {len(errors) - MAX_REPORTED} more")
    return "; ".join(problems)


def _where(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path or "the event"


def _what(error: ErrorDetails) -> str:
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
    return _MESSAGES.get(kind) or error["msg"]
