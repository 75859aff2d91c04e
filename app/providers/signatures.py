"""How a webhook signature check refuses, for every provider."""

from __future__ import annotations

from app.errors import Malformed, Unauthenticated


class SignatureUnreadable(Malformed):
    """Signature headers or body that cannot be read: missing, malformed, not UTF-8."""

    code = "malformed_signature"

    def __init__(self, *, code: str, message: str) -> None:
        super().__init__(message, code=code)


class SignatureRejected(Unauthenticated):
    """A readable signature that no configured secret made, or one outside the time tolerance."""

    code = "invalid_signature"

    def __init__(self, *, code: str, message: str) -> None:
        super().__init__(message, code=code)
