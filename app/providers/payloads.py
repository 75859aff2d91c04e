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

from collections.abc import Collection
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, ValidationError

from app.errors import PayloadError
from app.validation import Instant, Int32, Int64, UnixInstant, describe, storable

__all__ = ["Instant", "Int32", "Int64", "JsonObject", "NonEmptyStr", "UnixInstant", "one_of", "validate"]

T = TypeVar("T")

NonEmptyStr = Annotated[str, Field(min_length=1), AfterValidator(storable)]
"""Provider text is stored as sent, so it must be storable (no NUL, no lone surrogate)."""


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


def validate(shape: TypeAdapter[T], value: object) -> T:
    """Already-parsed JSON read as `shape`, strictly; any shape error is a PayloadError.

    Calls the adapter's core validator directly: `TypeAdapter.validate_python` adds about 0.4 µs a
    call around it, and every shape here is complete when its adapter is built."""
    try:
        result: T = shape.validator.validate_python(value, strict=True)
        return result
    except ValidationError as error:
        raise PayloadError(describe(error.errors(include_url=False, include_input=False))) from None
