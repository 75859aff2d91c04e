"""Verifying `Stripe-Signature` on the exact bytes received.

The SDK's `WebhookSignature.verify_header` checks the HMAC and rejects stale timestamps; it lets a
timestamp from the future pass, so the skew check here closes that replay window too.
"""

from __future__ import annotations

import time

import stripe

from app.providers.signatures import SignatureRejected, SignatureUnreadable


def _parse_header(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise ValueError("item without '='")
        if key == "t":
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None:
        raise ValueError("no timestamp")
    return timestamp, signatures


def verify_stripe_signature(
    body: bytes, header: str | None, secrets: tuple[str, ...], *, tolerance: int = 300, now: float | None = None
) -> None:
    """Raise a signature error unless one of the secrets signed `body` within the tolerance."""
    if not header:
        raise SignatureUnreadable(code="missing_signature", message="the Stripe-Signature header is missing")
    try:
        timestamp, signatures = _parse_header(header)
    except ValueError:
        raise SignatureUnreadable(
            code="malformed_signature", message="the Stripe-Signature header cannot be parsed"
        ) from None
    if not signatures:
        raise SignatureUnreadable(code="malformed_signature", message="the Stripe-Signature header has no v1 signature")
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise SignatureRejected(
            code="stale_signature", message=f"the signature timestamp is more than {tolerance} s from now"
        )
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureUnreadable(code="invalid_body", message="the body is not UTF-8") from None
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(body, header, secret, tolerance=None)
            return
        except stripe.SignatureVerificationError:
            continue
    raise SignatureRejected(code="invalid_signature", message="no configured secret matches the signature")
