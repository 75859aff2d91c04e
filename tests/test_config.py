"""A missing or malformed setting stops start-up with one clear line per problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import ConfigError, settings_from_env

FIXTURE_PLANS = Path(__file__).parent / "fixtures" / "plans.toml"
DODO_KEY = "whsec_dGFsbHktZG9kby1jdXJyZW50LXRlc3Qta2V5LTAxMjM0NTY3"
DODO_OLD_KEY = "whsec_dGFsbHktZG9kby1vbGQtcm90YXRlZC1rZXktNzY1NDMyMTA="
VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "BROKER_URL",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_API_KEY",
    "STRIPE_API_BASE",
    "DODO_PAYMENTS_WEBHOOK_KEY",
    "DODO_PAYMENTS_API_KEY",
    "DODO_PAYMENTS_BASE_URL",
    "TALLY_API_KEYS",
    "TALLY_PLANS",
    "TALLY_APPROACHING_LIMIT",
    "TALLY_MAX_ATTEMPTS",
    "TALLY_RETRY_MIN_BACKOFF_MS",
    "TALLY_RETRY_MAX_BACKOFF_MS",
    "TALLY_SWEEP_AFTER_SECONDS",
    "TALLY_WORKER_THREADS",
    "TALLY_DB_POOL_SIZE",
)


def test_defaults_are_the_embedded_system():
    settings = settings_from_env({})
    assert settings.database_url == "sqlite:///tally.db"
    assert settings.broker_kind == "inprocess"


def test_urls_choose_the_broker_and_normalise_postgres():
    assert settings_from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"}).broker_kind == "redis"
    assert settings_from_env({"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/%2F"}).broker_kind == "rabbitmq"
    assert settings_from_env({"DATABASE_URL": "postgres://u@h/db"}).database_url == "postgresql+psycopg://u@h/db"


def test_every_problem_is_reported_at_once(tmp_path: Path):
    bad_plans = tmp_path / "plans.toml"
    bad_plans.write_text('[plans.x]\nstripe_price = "p"\nincluded = -5\n')
    with pytest.raises(ConfigError) as caught:
        settings_from_env(
            {
                "DATABASE_URL": "mysql://nope",
                "BROKER_URL": "kafka://x",
                "STRIPE_WEBHOOK_SECRET": "sk_live_not_a_webhook_secret",
                "DODO_PAYMENTS_WEBHOOK_KEY": "whsec_***not base64***",
                "TALLY_API_KEYS": "short",
                "TALLY_PLANS": str(bad_plans),
                "TALLY_MAX_ATTEMPTS": "many",
                "TALLY_APPROACHING_LIMIT": "2",
            }
        )
    problems = caught.value.problems
    assert len(problems) == 8
    assert all("\n" not in line for line in problems)
    assert any(line.startswith("TALLY_PLANS: plans.x.included") for line in problems)


def test_the_catalogue_is_checked(tmp_path: Path):
    plans = tmp_path / "plans.toml"
    plans.write_text(
        '[plans.a]\nincluded = 10\nhard_cap = 5\nstripe_price = "p"\n'
        "[plans.b]\nincluded = 1\n"
        '[plans.c]\nincluded = 1.5\nstripe_price = "q"\n'
        '[meters.m]\nevent_name = "e"\nentitlement = "x"\naggregation = "sum"\n'
    )
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"TALLY_PLANS": str(plans)})
    text = "\n".join(caught.value.problems)
    assert "hard_cap (5) is below included (10)" in text
    assert "plans.b needs stripe_price" in text
    assert "plans.c.included has more than the 0 decimal places" in text
    assert "meters.m.key is needed" in text
    assert settings_from_env({"TALLY_PLANS": str(Path(__file__).parent / "fixtures" / "plans.toml")}).catalogue.plans


def test_the_cli_fails_at_start_up_with_one_line():
    env = {**os.environ, "TALLY_API_KEYS": "short"}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "verify"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tally: configuration error: TALLY_API_KEYS: every token must be at least 16 characters long"
    )


def test_each_problem_is_one_line_that_names_its_variable(tmp_path: Path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        settings_from_env(
            {
                "DATABASE_URL": "mysql://nope",
                "REDIS_URL": "redis://127.0.0.1:6379/0",
                "BROKER_URL": "redis://127.0.0.1:6379/1",
                "STRIPE_API_BASE": "ftp://files.example",
                "DODO_PAYMENTS_BASE_URL": "not a url",
                "TALLY_PLANS": str(missing),
                "TALLY_APPROACHING_LIMIT": "0",
                "TALLY_MAX_ATTEMPTS": "x",
                "TALLY_RETRY_MIN_BACKOFF_MS": "-1",
                "TALLY_RETRY_MAX_BACKOFF_MS": "lots",
                "TALLY_SWEEP_AFTER_SECONDS": "1.5",
                "TALLY_WORKER_THREADS": "0",
                "TALLY_DB_POOL_SIZE": "0",
            }
        )
    assert caught.value.problems == [
        "DATABASE_URL must be a sqlite:// or postgresql:// URL, got mysql://…",
        "set REDIS_URL or BROKER_URL, not both with different values",
        "STRIPE_API_BASE must be an http:// or https:// URL",
        "DODO_PAYMENTS_BASE_URL must be an http:// or https:// URL",
        f"TALLY_PLANS: {missing} does not exist",
        "TALLY_APPROACHING_LIMIT='0' must be greater than 0",
        "TALLY_MAX_ATTEMPTS='x' is not a whole number",
        "TALLY_RETRY_MIN_BACKOFF_MS='-1' must be at least 0",
        "TALLY_RETRY_MAX_BACKOFF_MS='lots' is not a whole number",
        "TALLY_SWEEP_AFTER_SECONDS='1.5' is not a whole number",
        "TALLY_WORKER_THREADS='0' must be at least 1",
        "TALLY_DB_POOL_SIZE='0' must be at least 1",
    ]
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_the_cli_prints_every_problem_from_the_process_environment():
    env = {**os.environ, "TALLY_API_KEYS": "short", "TALLY_MAX_ATTEMPTS": "0", "STRIPE_API_BASE": "localhost:12111"}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "verify"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "tally: configuration error: STRIPE_API_BASE must be an http:// or https:// URL",
        "tally: configuration error: TALLY_API_KEYS: every token must be at least 16 characters long",
        "tally: configuration error: TALLY_MAX_ATTEMPTS='0' must be at least 1",
    ]


def test_comma_separated_lists_are_split_and_trimmed_not_read_as_json():
    settings = settings_from_env(
        {
            "STRIPE_WEBHOOK_SECRET": " whsec_old , whsec_new ,",
            "DODO_PAYMENTS_WEBHOOK_KEY": f"{DODO_OLD_KEY},{DODO_KEY}",
            "TALLY_API_KEYS": "first-service-token-0001,second-service-token-0002",
        }
    )
    assert settings.stripe_webhook_secrets == ("whsec_old", "whsec_new")
    assert settings.dodo_webhook_keys == (DODO_OLD_KEY, DODO_KEY)
    assert settings.api_keys == ("first-service-token-0001", "second-service-token-0002")
    assert settings_from_env({"STRIPE_WEBHOOK_SECRET": "whsec_only"}).stripe_webhook_secrets == ("whsec_only",)
    assert settings_from_env({"STRIPE_WEBHOOK_SECRET": ""}).stripe_webhook_secrets == ()
    assert settings_from_env({"TALLY_API_KEYS": '["0123456789abcdef"]'}).api_keys == ('["0123456789abcdef"]',)


def test_the_process_environment_reads_as_a_mapping_does(monkeypatch: pytest.MonkeyPatch):
    env = {
        "DATABASE_URL": "postgres://u@h/db",
        "REDIS_URL": "redis://127.0.0.1:6379/3",
        "STRIPE_WEBHOOK_SECRET": "whsec_a, whsec_b",
        "STRIPE_API_BASE": "http://127.0.0.1:12111",
        "DODO_PAYMENTS_WEBHOOK_KEY": DODO_KEY,
        "TALLY_API_KEYS": "first-service-token-0001,second-service-token-0002",
        "TALLY_PLANS": str(FIXTURE_PLANS),
        "TALLY_APPROACHING_LIMIT": "0.9",
        "TALLY_MAX_ATTEMPTS": "3",
        "TALLY_WORKER_THREADS": "",
    }
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    from_process = settings_from_env()
    assert from_process == settings_from_env(env)
    assert from_process.stripe_webhook_secrets == ("whsec_a", "whsec_b")
    assert from_process.api_keys == ("first-service-token-0001", "second-service-token-0002")
    assert from_process.database_url == "postgresql+psycopg://u@h/db"
    assert (from_process.broker_url, from_process.broker_kind) == ("redis://127.0.0.1:6379/3", "redis")
    assert from_process.max_attempts == 3 and from_process.worker_threads == 4
    assert from_process.catalogue.plans


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:////tmp/tally.db", "sqlite:////tmp/tally.db"),
        ("", "sqlite:///tally.db"),
    ],
)
def test_database_urls_are_normalised_to_psycopg(given: str, expected: str):
    settings = settings_from_env({"DATABASE_URL": given})
    assert settings.database_url == expected
    assert settings.is_sqlite == expected.startswith("sqlite")


@pytest.mark.parametrize(
    ("env", "url", "kind"),
    [
        ({"REDIS_URL": "redis://h:6379/0"}, "redis://h:6379/0", "redis"),
        ({"REDIS_URL": "rediss://h:6380/0", "BROKER_URL": "rediss://h:6380/0"}, "rediss://h:6380/0", "redis"),
        ({"BROKER_URL": "unix:///run/redis.sock"}, "unix:///run/redis.sock", "redis"),
        ({"BROKER_URL": "amqps://u:p@h/vhost"}, "amqps://u:p@h/vhost", "rabbitmq"),
        ({"BROKER_URL": ""}, None, "inprocess"),
    ],
)
def test_either_variable_names_the_broker(env: dict[str, str], url: str | None, kind: str):
    settings = settings_from_env(env)
    assert (settings.broker_url, settings.broker_kind) == (url, kind)


def test_api_bases_are_http_urls_when_set():
    settings = settings_from_env(
        {"STRIPE_API_BASE": "http://127.0.0.1:12111", "DODO_PAYMENTS_BASE_URL": "https://test.dodopayments.com"}
    )
    assert (settings.stripe_api_base, settings.dodo_base_url) == (
        "http://127.0.0.1:12111",
        "https://test.dodopayments.com",
    )
    assert settings_from_env({}).stripe_api_base is None


def test_an_unusable_plans_path_is_one_line(tmp_path: Path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[plans.x\n")
    for path, problem in [
        (tmp_path / "nope.toml", f"TALLY_PLANS: {tmp_path / 'nope.toml'} does not exist"),
        (tmp_path, f"TALLY_PLANS: {tmp_path} cannot be read (Is a directory)"),
        (broken, f"TALLY_PLANS: {broken} is not valid TOML"),
    ]:
        with pytest.raises(ConfigError) as caught:
            settings_from_env({"TALLY_PLANS": str(path)})
        assert len(caught.value.problems) == 1
        assert caught.value.problems[0].startswith(problem)


def test_settings_are_frozen_and_varied_by_copy():
    settings = settings_from_env({})
    with pytest.raises(ValidationError):
        settings.max_attempts = 1  # type: ignore[misc]
    varied = settings.model_copy(update={"dodo_webhook_keys": (DODO_KEY,)})
    assert varied.dodo_webhook_keys == (DODO_KEY,)
    assert settings.dodo_webhook_keys == ()
