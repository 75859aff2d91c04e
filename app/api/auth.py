"""Bearer tokens for the internal API.

Service tokens read and write any customer; customer-scoped tokens see only their own customer.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from app.db import Database
from app.errors import Forbidden, Malformed, Unauthenticated
from app.keys import find_key, hash_token


@dataclass(frozen=True)
class Principal:
    scope: str  # service | customer
    customer_id: str | None = None

    def customer_for(self, requested: str | None) -> str:
        """The customer this request is about, enforcing the token's scope."""
        if self.scope == "customer":
            if requested and requested != self.customer_id:
                raise Forbidden("this token may only read its own customer")
            assert self.customer_id is not None
            return self.customer_id
        if not requested:
            raise Malformed("a service token must name the customer with ?customer_id=", code="customer_required")
        return requested

    def check_customer(self, customer_id: str) -> None:
        if self.scope == "customer" and customer_id != self.customer_id:
            raise Forbidden("this token may only read its own customer")

    def require_service(self) -> None:
        if self.scope != "service":
            raise Forbidden("only service tokens may do this")


class Authenticator:
    def __init__(self, db: Database, bootstrap_tokens: tuple[str, ...]):
        self.db = db
        self.bootstrap_hashes = tuple(hash_token(token) for token in bootstrap_tokens)

    def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("send Authorization: Bearer <token>")
        token_hash = hash_token(token.strip())
        if any(hmac.compare_digest(token_hash, known) for known in self.bootstrap_hashes):
            return Principal("service")
        key = find_key(self.db, token_hash)
        if key is None:
            raise Unauthenticated("unknown or revoked token")
        return Principal(key.scope, key.customer_id)
