"""API tokens: created once, stored only as a hash, looked up by hash.

Tokens are random, so a SHA-256 hash is enough to store them safely (no password hashing needed).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, select

from app.db import AsyncDatabase, Database, table_of
from app.models import ApiKey

TOKEN_PREFIX = "tly_"


@dataclass(frozen=True)
class KeyScope:
    scope: str  # service | customer
    customer_id: str | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_key(db: Database, *, scope: str, customer_id: str | None = None, label: str | None = None) -> str:
    """Store a new token's hash and return the token (shown once, never stored)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with db.write() as session:
        session.add(ApiKey(token_hash=hash_token(token), scope=scope, customer_id=customer_id, label=label))
    return token


def find_key(db: Database, token_hash: str) -> KeyScope | None:
    """The scope of an unrevoked stored token, by its hash."""
    with db.read() as session:
        key = session.execute(
            select(ApiKey).where(ApiKey.token_hash == token_hash, ApiKey.revoked_at.is_(None))
        ).scalar_one_or_none()
        return None if key is None else KeyScope(key.scope, key.customer_id)


_api_keys = table_of(ApiKey)
_FIND_KEY = select(_api_keys.c.scope, _api_keys.c.customer_id).where(
    _api_keys.c.token_hash == bindparam("token_hash"), _api_keys.c.revoked_at.is_(None)
)


async def find_key_async(adb: AsyncDatabase, token_hash: str) -> KeyScope | None:
    """`find_key` on the event loop: two columns by the unique hash, no ORM object."""
    async with adb.read() as connection:
        row = (await connection.execute(_FIND_KEY, {"token_hash": token_hash})).first()
    return None if row is None else KeyScope(row.scope, row.customer_id)
