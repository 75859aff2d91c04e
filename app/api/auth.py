"""Bearer tokens for the internal API.

Service tokens read and write any customer; customer-scoped tokens see only their own customer.
Tokens are random, so a SHA-256 hash is enough to store them safely (no password hashing needed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from app.db import Database
from app.errors import ApiError
from app.models import ApiKey

TOKEN_PREFIX = "tly_"


@dataclass(frozen=True)
class Principal:
    scope: str  # service | customer
    customer_id: str | None = None

    def customer_for(self, requested: str | None) -> str:
        """The customer this request is about, enforcing the token's scope."""
        if self.scope == "customer":
            if requested and requested != self.customer_id:
                raise ApiError(403, "forbidden", "this token may only read its own customer")
            assert self.customer_id is not None
            return self.customer_id
        if not requested:
            raise ApiError(400, "customer_required", "a service token must name the customer with ?customer_id=")
        return requested

    def check_customer(self, customer_id: str) -> None:
        if self.scope == "customer" and customer_id != self.customer_id:
            raise ApiError(403, "forbidden", "this token may only read its own customer")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_key(db: Database, *, scope: str, customer_id: str | None = None, label: str | None = None) -> str:
    """Store a new token's hash and return the token (shown once, never stored)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with db.write() as session:
        session.add(ApiKey(token_hash=hash_token(token), scope=scope, customer_id=customer_id, label=label))
    return token


class Authenticator:
    def __init__(self, db: Database, bootstrap_tokens: tuple[str, ...]):
        self.db = db
        self.bootstrap_hashes = tuple(hash_token(token) for token in bootstrap_tokens)

    def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")
        token_hash = hash_token(token.strip())
        if any(hmac.compare_digest(token_hash, known) for known in self.bootstrap_hashes):
            return Principal("service")
        with self.db.read() as session:
            key = session.execute(
                select(ApiKey).where(ApiKey.token_hash == token_hash, ApiKey.revoked_at.is_(None))
            ).scalar_one_or_none()
        if key is None:
            raise ApiError(401, "unauthorized", "unknown or revoked token")
        return Principal(key.scope, key.customer_id)
