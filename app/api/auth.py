"""Bearer tokens for the internal API.

Service tokens read and write any customer; customer-scoped tokens see only their own customer.

Tokens stored in the database are resolved through a small in-process cache (`TokenCache`), so a
busy client costs one lookup a second instead of one a request; a revoked token stops working within
`TOKEN_TTL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.api.credit_documents import DRIVER_OUTAGES, database_unavailable
from app.db import AsyncDatabase, Database
from app.errors import Forbidden, Malformed, Unauthenticated
from app.group_commit import is_outage
from app.keys import KeyScope, find_key_async, hash_token

TOKEN_TTL_SECONDS = 1.0
"""How long a stored token's scope (or its absence) is believed: revocation is visible within this."""
MAX_CACHED_TOKENS = 4096
"""Known tokens kept at most; past it the least recently used goes (and is looked up again if it returns)."""
MAX_CACHED_UNKNOWN = 1024
"""Unknown tokens remembered at most, apart from known ones: a flood of made-up tokens evicts only its own kind."""


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


SERVICE = Principal("service")

Lookup = Callable[[], Awaitable[KeyScope | None]]


class TokenCache:
    """Token hash → principal (or None for an unknown token), each entry believed for `ttl` seconds.

    - Bounded twice over (known and unknown tokens apart), least recently used out first, so no stream
      of requests can grow it past `max_known + max_unknown` entries.
    - One lookup per hash at a time: requests arriving while it is in flight wait for its answer,
      so an expiring entry under load costs one query, not one per concurrent request.
    - An entry expires `ttl` after its lookup *started*: the row it read can be no older than that.
    """

    def __init__(
        self,
        *,
        ttl: float = TOKEN_TTL_SECONDS,
        max_known: int = MAX_CACHED_TOKENS,
        max_unknown: int = MAX_CACHED_UNKNOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl, self.clock = ttl, clock
        self._limits = {True: max_known, False: max_unknown}
        self._entries: dict[bool, OrderedDict[str, tuple[float, Principal | None]]] = {
            True: OrderedDict(),
            False: OrderedDict(),
        }
        self._in_flight: dict[str, asyncio.Future[Principal | None]] = {}

    def __len__(self) -> int:
        return len(self._entries[True]) + len(self._entries[False])

    async def resolve(self, token_hash: str, lookup: Lookup) -> Principal | None:
        """The cached principal of the hash, else `lookup()`'s (shared with concurrent callers), remembered."""
        now = self.clock()
        for entries in self._entries.values():
            entry = entries.get(token_hash)
            if entry is not None:
                if entry[0] > now:
                    entries.move_to_end(token_hash)
                    return entry[1]
                del entries[token_hash]
        pending = self._in_flight.get(token_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._in_flight[token_hash] = future
        try:
            scope = await lookup()
        except Exception as error:
            future.set_exception(error)  # the waiters fail alike (the database down: 503 for all)
            future.exception()  # retrieved here: no "never retrieved" warning when nobody else waited
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._in_flight[token_hash]
        principal = None if scope is None else Principal(scope.scope, scope.customer_id)
        self._remember(token_hash, now + self.ttl, principal)
        future.set_result(principal)
        return principal

    def _remember(self, token_hash: str, expires: float, principal: Principal | None) -> None:
        entries = self._entries[principal is not None]
        entries[token_hash] = (expires, principal)
        entries.move_to_end(token_hash)
        while len(entries) > self._limits[principal is not None]:
            entries.popitem(last=False)


class Authenticator:
    """Bootstrap service tokens (`TALLY_API_KEYS`) in memory; stored tokens through the cache."""

    def __init__(self, db: Database, bootstrap_tokens: tuple[str, ...]):
        self.db = db  # the app's sync database; stored tokens are read on the async one (`authenticate`)
        self.bootstrap_hashes = tuple(hash_token(token) for token in bootstrap_tokens)
        self.cache = TokenCache()

    async def authenticate(self, authorization: str | None, adb: AsyncDatabase) -> Principal:
        """The caller's principal, on the event loop; stored tokens are read through `adb` at most once a second."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("send Authorization: Bearer <token>")
        token_hash = hash_token(token.strip())
        if any(hmac.compare_digest(token_hash, known) for known in self.bootstrap_hashes):
            return SERVICE

        async def lookup() -> KeyScope | None:
            try:
                return await find_key_async(adb, token_hash)
            except Exception as error:
                if is_outage(error) or isinstance(error, DRIVER_OUTAGES):
                    raise database_unavailable() from error
                raise

        principal = await self.cache.resolve(token_hash, lookup)
        if principal is None:
            raise Unauthenticated("unknown or revoked token")
        return principal
