"""The one place Tally reads its configuration.

Everything comes from the environment (SPEC section 2) and is validated once, at start-up, so a
bad setting stops the process with one clear line per problem instead of failing at the first
request. `Settings` is a pydantic-settings class: each field names its environment variable, and
pydantic collects every problem in one ValidationError, which `settings_from_env` turns into
`ConfigError` lines that name the variable.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, PlainValidator, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.catalogue import Catalogue, CatalogueError, load_catalogue

DEFAULT_DATABASE_URL = "sqlite:///tally.db"
BROKER_SCHEMES = ("redis://", "rediss://", "unix://", "amqp://", "amqps://")

# The error type of a problem whose message is already the finished line(s) for ConfigError.
_PROBLEM = "tally_setting"

# pydantic's own error types, worded as today's start-up lines: `NAME='value' <phrase>`.
_PHRASES = {
    "int_parsing": "is not a whole number",
    "int_from_float": "is not a whole number",
    "int_type": "is not a whole number",
    "decimal_parsing": "is not a number",
    "decimal_type": "is not a number",
    "finite_number": "is not a finite number",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be greater than {gt}",
    "less_than_equal": "must be at most {le}",
}


class ConfigError(Exception):
    """Raised with every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _problem(text: str) -> PydanticCustomError:
    """A validation error whose message is the finished line (or lines) `tally` prints, naming the variable."""
    return PydanticCustomError(_PROBLEM, "{problem}", {"problem": text})


def _load_plans(value: object) -> Catalogue:
    """TALLY_PLANS is a path; the catalogue behind it is loaded and checked now, not at the first webhook."""
    if isinstance(value, Catalogue):
        return value
    path = Path(str(value))
    try:
        return load_catalogue(path)
    except CatalogueError as error:
        lines = [line for problem in error.problems for line in problem.splitlines()]
    except OSError as error:  # a directory, no permission: load_catalogue only words a missing file
        lines = [f"{path} cannot be read ({error.strerror or error})"]
    raise _problem("\n".join(f"TALLY_PLANS: {line}" for line in lines))


class Settings(BaseSettings):
    """Every setting Tally reads, with its environment variable as the validation alias.

    Frozen, because one instance is shared by the whole process; tests derive variants with
    `settings.model_copy(update={...})` (which, like `dataclasses.replace` before, does not re-validate).
    """

    model_config = SettingsConfigDict(
        frozen=True,
        case_sensitive=True,  # as os.environ is on the platforms Tally runs on
        env_ignore_empty=True,  # `VAR=` means unset, as it always has
        enable_decoding=False,  # no variable holds JSON: lists are comma-separated (see `_comma_list`)
    )

    database_url: str = Field(default=DEFAULT_DATABASE_URL, validation_alias="DATABASE_URL")
    # REDIS_URL is only read to be merged into broker_url (either may name the broker); read broker_url.
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    broker_url: str | None = Field(default=None, validation_alias="BROKER_URL")
    stripe_webhook_secrets: tuple[str, ...] = Field(default=(), validation_alias="STRIPE_WEBHOOK_SECRET")
    stripe_api_key: str | None = Field(default=None, validation_alias="STRIPE_API_KEY")
    stripe_api_base: str | None = Field(default=None, validation_alias="STRIPE_API_BASE")
    dodo_webhook_keys: tuple[str, ...] = Field(default=(), validation_alias="DODO_PAYMENTS_WEBHOOK_KEY")
    dodo_api_key: str | None = Field(default=None, validation_alias="DODO_PAYMENTS_API_KEY")
    dodo_base_url: str | None = Field(default=None, validation_alias="DODO_PAYMENTS_BASE_URL")
    api_keys: tuple[str, ...] = Field(default=(), validation_alias="TALLY_API_KEYS")
    catalogue: Annotated[Catalogue, PlainValidator(_load_plans)] = Field(
        default_factory=Catalogue, validation_alias="TALLY_PLANS"
    )
    approaching_limit_ratio: Decimal = Field(
        default=Decimal("0.8"), gt=0, le=1, validation_alias="TALLY_APPROACHING_LIMIT"
    )
    max_attempts: int = Field(default=8, ge=1, validation_alias="TALLY_MAX_ATTEMPTS")
    retry_min_backoff_ms: int = Field(default=1_000, ge=0, validation_alias="TALLY_RETRY_MIN_BACKOFF_MS")
    retry_max_backoff_ms: int = Field(default=300_000, ge=0, validation_alias="TALLY_RETRY_MAX_BACKOFF_MS")
    sweep_after_seconds: int = Field(default=60, ge=0, validation_alias="TALLY_SWEEP_AFTER_SECONDS")
    worker_threads: int = Field(default=4, ge=1, validation_alias="TALLY_WORKER_THREADS")
    db_pool_size: int = Field(default=20, ge=1, validation_alias="TALLY_DB_POOL_SIZE")
    reconcile_at: str = Field(default="03:00", validation_alias="TALLY_RECONCILE_AT")
    reconcile_rate: float = Field(default=20.0, gt=0, validation_alias="TALLY_RECONCILE_RATE")
    reconcile_retries: int = Field(default=5, ge=0, validation_alias="TALLY_RECONCILE_RETRIES")
    reconcile_backoff_ms: int = Field(default=500, ge=0, validation_alias="TALLY_RECONCILE_BACKOFF_MS")
    # Stripe's and Standard Webhooks' tolerance; no documented variable (pydantic-settings would read one
    # spelled exactly `webhook_tolerance_seconds`, as it reads every field without an alias).
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

    @field_validator("database_url")
    @classmethod
    def _psycopg_database(cls, value: str) -> str:
        """Heroku-style postgres:// URLs name the driver SQLAlchemy should use: psycopg 3."""
        for scheme in ("postgres://", "postgresql://"):
            if value.startswith(scheme):
                value = "postgresql+psycopg://" + value.removeprefix(scheme)
        if not value.startswith(("sqlite", "postgresql")):
            raise _problem(f"DATABASE_URL must be a sqlite:// or postgresql:// URL, got {value.split(':')[0]}://…")
        return value

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _known_broker(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and not value.startswith(BROKER_SCHEMES):
            raise _problem(f"{_variable(info)} must start with redis://, rediss://, unix://, amqp:// or amqps://")
        return value

    @field_validator("broker_url")
    @classmethod
    def _one_broker(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Either variable names the broker; two different ones would leave the choice to chance."""
        redis_url = info.data.get("redis_url")
        if value and redis_url and value != redis_url:
            raise _problem("set REDIS_URL or BROKER_URL, not both with different values")
        return value or redis_url

    @field_validator("stripe_webhook_secrets", "dodo_webhook_keys", "api_keys", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        """`a, b` means ("a", "b"): several secrets live side by side while one is rolled."""
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("stripe_webhook_secrets")
    @classmethod
    def _stripe_secrets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not secret.startswith("whsec_") for secret in value):
            raise _problem("STRIPE_WEBHOOK_SECRET: every secret must start with whsec_")
        return value

    @field_validator("dodo_webhook_keys")
    @classmethod
    def _dodo_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key in value:
            try:
                base64.b64decode(key.removeprefix("whsec_"), validate=True)
            except ValueError:
                raise _problem("DODO_PAYMENTS_WEBHOOK_KEY: every key must be whsec_ followed by base64") from None
        return value

    @field_validator("api_keys")
    @classmethod
    def _long_api_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(len(key) < 16 for key in value):
            raise _problem("TALLY_API_KEYS: every token must be at least 16 characters long")
        return value

    @field_validator("reconcile_at")
    @classmethod
    def _time_of_day(cls, value: str) -> str:
        """HH:MM in UTC, when the clock starts the nightly reconciliation."""
        hours, _, minutes = value.strip().partition(":")
        if not (hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60 and len(minutes) == 2):
            raise _problem("TALLY_RECONCILE_AT must be a UTC time of day as HH:MM, e.g. 03:00")
        return f"{int(hours):02d}:{minutes}"

    @field_validator("stripe_api_base", "dodo_base_url")
    @classmethod
    def _http_base(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Reconciliation calls these bases; a typo should stop start-up, not the nightly run."""
        if value is None:
            return None
        try:
            parts = urlsplit(value)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise _problem(f"{_variable(info)} must be an http:// or https:// URL")
        return value


def _variable(info: ValidationInfo) -> str:
    """The environment variable of the field being validated."""
    return _variable_of(str(info.field_name), Settings.model_fields[str(info.field_name)])


def _variable_of(name: str, field: FieldInfo) -> str:
    """A field's environment variable: its alias, or (as pydantic-settings does) its own name."""
    return field.validation_alias if isinstance(field.validation_alias, str) else name


def _problems(error: ValidationError) -> list[str]:
    """One line per problem, each naming its environment variable."""
    problems: list[str] = []
    for detail in error.errors(include_url=False):
        if detail["type"] == _PROBLEM:
            problems.extend(detail["msg"].splitlines())
            continue
        variable = ".".join(str(part) for part in detail["loc"]) or "settings"
        phrase = _PHRASES.get(detail["type"])
        if phrase is None:  # not echoing the value: it may be a secret
            problems.append(f"{variable}: {detail['msg']}")
        else:
            problems.append(f"{variable}={detail['input']!r} {phrase.format(**detail.get('ctx', {}))}")
    return problems


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings from `env` (the process environment when None).

    Raises ConfigError listing every problem. The process environment is read by pydantic-settings
    itself. A given mapping is passed in as keyword arguments for every variable (its value, or the
    field's default when unset or empty); keyword arguments outrank the environment source, so the
    process environment cannot leak into a mapping a test builds.
    """
    try:
        if env is None:
            return Settings()
        arguments: dict[str, Any] = {}
        for name, field in Settings.model_fields.items():
            variable = _variable_of(name, field)
            value = env.get(variable)
            arguments[variable] = value if value else field.get_default(call_default_factory=True)
        return Settings(**arguments)
    except ValidationError as error:
        raise ConfigError(_problems(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return settings_from_env()
