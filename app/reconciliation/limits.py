"""Calling a provider's API politely: a client-side rate limit, and bounded retries.

Every request of a run goes through one `ApiCaller` per provider, so the run knows how many calls it
made and never exceeds the configured rate (Stripe allows 25 requests a second per endpoint in test
mode; the default stays below it). A 429 is retried after the provider's `Retry-After` (Stripe's SDK
never retries a 429 itself); a 5xx or a refused or reset connection is retried with exponential
backoff. Past the bounded number of retries the provider counts as down: `ProviderUnavailable`
stops the run, which is then stored as failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from prometheus_client import Counter

from app.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

API_CALLS = Counter(
    "tally_reconciliation_api_calls_total", "Provider API requests made by reconciliation", ["provider"]
)

MAX_RETRY_AFTER_SECONDS = 60.0
"""A longer `Retry-After` is capped: the run would rather fail and be retried the next night."""


class ProviderUnavailable(Unavailable):
    """The provider kept failing (or refused the credentials): the run cannot finish."""

    code = "provider_unavailable"


class Failure(NamedTuple):
    """How a provider error is handled: retried (after `retry_after` seconds, when the provider said)."""

    retryable: bool
    retry_after: float | None = None


Classify = Callable[[Exception], Failure | None]
"""None: not an API failure (e.g. a 404 the caller handles), raised as it is."""


class RateLimiter:
    """At most `rate` requests a second, spaced evenly (a bucket of one: no bursts past the provider's limit)."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self.clock()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            self.sleep(wait)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER_SECONDS)
        return float(min(self.backoff_seconds * 2**attempt, self.max_backoff_seconds))


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (the HTTP-date form is not used by either provider)."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


class ApiCaller:
    """Calls one provider's API under its rate limit and retry policy, counting every request."""

    def __init__(
        self,
        provider: str,
        classify: Classify,
        *,
        limiter: RateLimiter,
        policy: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.provider, self.classify = provider, classify
        self.limiter, self.policy, self.sleep = limiter, policy, sleep
        self.calls = 0

    def __call__(self, request: Callable[[], T], what: str) -> T:
        attempt = 0
        while True:
            self.limiter.acquire()
            self.calls += 1
            API_CALLS.labels(self.provider).inc()
            try:
                return request()
            except Exception as error:
                failure = self.classify(error)
                if failure is None:
                    raise
                if not failure.retryable or attempt >= self.policy.max_retries:
                    raise ProviderUnavailable(
                        f"{self.provider}: {what} failed after {attempt + 1} attempt(s): {_describe(error)}"
                    ) from error
                delay = self.policy.delay(attempt, failure.retry_after)
                log.warning(
                    "%s: %s failed (%s); retry %d of %d in %.1fs",
                    self.provider,
                    what,
                    _describe(error),
                    attempt + 1,
                    self.policy.max_retries,
                    delay,
                )
                self.sleep(delay)
                attempt += 1


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
