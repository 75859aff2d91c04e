"""Verifying Dodo Payments webhooks (Standard Webhooks) on the exact bytes received.

The `standardwebhooks` library computes the signature (`Webhook(key).sign`: HMAC-SHA256 over
"{id}.{timestamp}.{body}" keyed by the base64-decoded secret). Its `verify` is not called because it
reads the wall clock (the window is checked here, against an injectable `now`) and because it raises a
plain `ValueError` for a malformed signature entry, where one bad entry next to a valid one should
not fail the delivery. Headers are checked first: a malformed header is a 400, a signature that does
not verify or a timestamp outside ±5 minutes a 401, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from standardwebhooks import Webhook

from app.providers.signatures import SignatureRejected, SignatureUnreadable

HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def _check_headers(headers: Mapping[str, str], tolerance: int, now: float) -> tuple[str, str, str]:
    """The three headers, well-formed and in time, or the signature error that says what is wrong."""
    missing = [name for name in HEADERS if not headers.get(name)]
    if missing:
        raise SignatureUnreadable(code="missing_signature", message=f"missing header(s): {', '.join(missing)}")
    webhook_id, timestamp, signature = (headers[name] for name in HEADERS)
    if len(webhook_id) > 255:
        raise SignatureUnreadable(code="malformed_signature", message="webhook-id is too long")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise SignatureUnreadable(code="malformed_signature", message="webhook-timestamp must be unix seconds")
    if abs(now - int(timestamp)) > tolerance:
        raise SignatureRejected(
            code="stale_signature", message=f"webhook-timestamp is more than {tolerance} s from now"
        )
    return webhook_id, timestamp, signature


def verify_dodo_signature(
    body: bytes,
    headers: Mapping[str, str],
    keys: tuple[str, ...],
    *,
    tolerance: int = 300,
    now: float | None = None,
) -> str:
    """Return the webhook-id (the dedupe key) when one of the keys signed `body`; raise a signature error otherwise."""
    webhook_id, timestamp, signature = _check_headers(headers, tolerance, time.time() if now is None else now)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureUnreadable(code="invalid_body", message="the body is not UTF-8") from None
    # Only well-formed v1 entries are compared: an unknown version or bad base64 in one entry must
    # not hide a valid signature next to it (the library's verify would raise ValueError on it).
    usable = []
    for entry in signature.split():
        version, _, encoded = entry.partition(",")
        try:
            if version == "v1" and binascii.a2b_base64(encoded.encode("ascii"), strict_mode=True):
                usable.append(entry)
        except (binascii.Error, UnicodeEncodeError):
            continue
    if not usable:
        raise SignatureUnreadable(
            code="malformed_signature", message="webhook-signature has no well-formed 'v1,<base64>' entry"
        )
    signed_at = datetime.fromtimestamp(int(timestamp), UTC)
    text = body.decode("utf-8")
    for key in keys:
        expected = base64.b64decode(Webhook(key).sign(msg_id=webhook_id, timestamp=signed_at, data=text)[3:])
        if any(hmac.compare_digest(expected, base64.b64decode(entry[3:])) for entry in usable):
            return webhook_id
    raise SignatureRejected(code="invalid_signature", message="no configured key matches the signature")
