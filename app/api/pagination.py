"""Page-number pagination as the Dodo seeds define it: `page_size` (default 10, max 100), `page_number` from 0."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import QueryParams

from app.errors import ApiError

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class Page:
    size: int
    number: int

    @property
    def offset(self) -> int:
        return self.size * self.number


def _whole(params: QueryParams, name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, "invalid_parameter", f"{name} must be a whole number") from None
    if value < 0:
        raise ApiError(422, "invalid_parameter", f"{name} must not be negative")
    return value


def page_from(params: QueryParams) -> Page:
    size = _whole(params, "page_size", DEFAULT_PAGE_SIZE)
    if size > MAX_PAGE_SIZE:
        raise ApiError(422, "invalid_parameter", f"page_size must be at most {MAX_PAGE_SIZE}")
    return Page(size=size or DEFAULT_PAGE_SIZE, number=_whole(params, "page_number", 0))
