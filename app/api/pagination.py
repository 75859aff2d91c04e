"""Page-number pagination as the Dodo seeds define it: `page_size` (default 10, max 100), `page_number` from 0."""

from __future__ import annotations

from starlette.datastructures import QueryParams

from app.api.params import invalid_parameter, whole_param
from app.db import Page

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100


def page_from(params: QueryParams) -> Page:
    size = whole_param(params, "page_size", DEFAULT_PAGE_SIZE)
    if size > MAX_PAGE_SIZE:
        raise invalid_parameter(f"page_size must be at most {MAX_PAGE_SIZE}")
    return Page(size=size or DEFAULT_PAGE_SIZE, number=whole_param(params, "page_number", 0))
