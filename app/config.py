"""The one place Tally reads its configuration.

Everything comes from the environment (SPEC section 2) and is validated once, at start-up, so a
bad setting stops the process with one clear line per problem instead of failing at the first
request.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path

from app.catalogue import Catalogue, CatalogueError, load_catalogue

DEFAULT_DATABASE_URL = "sqlite:///tally.db"


class ConfigError(Exception):
    """Raised with every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str | None = None
    stripe_webhook_secrets: tuple[str, ...] = ()
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    dodo_webhook_keys: tuple[str, ...] = ()
    dodo_api_key: str | None = None
    dodo_base_url: str | None = None
    api_keys: tuple[str, ...] = ()
    catalogue: Catalogue = field(default_factory=Catalogue)
    approaching_limit_ratio: Decimal = Decimal("0.8")
    max_attempts: int = 8
    retry_min_backoff_ms: int = 1_000
    retry_max_backoff_ms: int = 300_000
    sweep_after_seconds: int = 60
    worker_threads: int = 4
    db_pool_size: int = 20
    webhook_tolerance_seconds: int = 300

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_kind(self) -> str:
        """`redis`, `rabbitmq` or `inprocess`: which Dramatiq broker the URL asks for."""
        if not self.broker_url:
            return "inprocess"
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return "redis"
        return "rabbitmq"


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _int(env: Mapping[str, str], name: str, default: int, problems: list[str], minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name}={raw!r} is not a whole number")
        return default
    if value < minimum:
        problems.append(f"{name}={raw!r} must be at least {minimum}")
    return value


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []

    database_url = env.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    if database_url.startswith("postgres://"):
        database_url = "postgresql+psycopg://" + database_url[len("postgres://") :]
    elif database_url.startswith("postgresql://"):
        database_url = "postgresql+psycopg://" + database_url[len("postgresql://") :]
    if not database_url.startswith(("sqlite", "postgresql")):
        problems.append(f"DATABASE_URL must be a sqlite:// or postgresql:// URL, got {database_url.split(':')[0]}://…")

    redis_url, broker_url = env.get("REDIS_URL"), env.get("BROKER_URL")
    if redis_url and broker_url and redis_url != broker_url:
        problems.append("set REDIS_URL or BROKER_URL, not both with different values")
    url = broker_url or redis_url or None
    if url and not url.startswith(("redis://", "rediss://", "unix://", "amqp://", "amqps://")):
        problems.append("BROKER_URL must start with redis://, rediss://, amqp:// or amqps://")

    stripe_secrets = _csv(env.get("STRIPE_WEBHOOK_SECRET"))
    for secret in stripe_secrets:
        if not secret.startswith("whsec_"):
            problems.append("STRIPE_WEBHOOK_SECRET: every secret must start with whsec_")
            break

    dodo_keys = _csv(env.get("DODO_PAYMENTS_WEBHOOK_KEY"))
    for key in dodo_keys:
        try:
            base64.b64decode(key.removeprefix("whsec_"), validate=True)
        except ValueError:
            problems.append("DODO_PAYMENTS_WEBHOOK_KEY: every key must be whsec_ followed by base64")
            break

    api_keys = _csv(env.get("TALLY_API_KEYS"))
    if any(len(key) < 16 for key in api_keys):
        problems.append("TALLY_API_KEYS: every token must be at least 16 characters long")

    catalogue = Catalogue()
    plans_path = env.get("TALLY_PLANS")
    if plans_path:
        try:
            catalogue = load_catalogue(Path(plans_path))
        except CatalogueError as error:
            problems.extend(f"TALLY_PLANS: {line}" for line in error.problems)

    ratio_raw = env.get("TALLY_APPROACHING_LIMIT", "0.8")
    try:
        ratio = Decimal(ratio_raw)
        if not (Decimal(0) < ratio <= Decimal(1)):
            raise InvalidOperation
    except InvalidOperation:
        problems.append(f"TALLY_APPROACHING_LIMIT={ratio_raw!r} must be a number in (0, 1]")
        ratio = Decimal("0.8")

    settings = Settings(
        database_url=database_url,
        broker_url=url,
        stripe_webhook_secrets=stripe_secrets,
        stripe_api_key=env.get("STRIPE_API_KEY") or None,
        stripe_api_base=env.get("STRIPE_API_BASE") or None,
        dodo_webhook_keys=dodo_keys,
        dodo_api_key=env.get("DODO_PAYMENTS_API_KEY") or None,
        dodo_base_url=env.get("DODO_PAYMENTS_BASE_URL") or None,
        api_keys=api_keys,
        catalogue=catalogue,
        approaching_limit_ratio=ratio,
        max_attempts=_int(env, "TALLY_MAX_ATTEMPTS", 8, problems, minimum=1),
        retry_min_backoff_ms=_int(env, "TALLY_RETRY_MIN_BACKOFF_MS", 1_000, problems),
        retry_max_backoff_ms=_int(env, "TALLY_RETRY_MAX_BACKOFF_MS", 300_000, problems),
        sweep_after_seconds=_int(env, "TALLY_SWEEP_AFTER_SECONDS", 60, problems),
        worker_threads=_int(env, "TALLY_WORKER_THREADS", 4, problems, minimum=1),
        db_pool_size=_int(env, "TALLY_DB_POOL_SIZE", 20, problems, minimum=1),
    )
    if problems:
        raise ConfigError(problems)
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return settings_from_env()
