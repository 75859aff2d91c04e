"""Errors that reach a client as `{"code": …, "message": …}` with an HTTP status."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message
        super().__init__(f"{status} {code}: {message}")


class PayloadError(Exception):
    """An authenticated event whose content cannot be applied: dead-lettered, never retried."""
