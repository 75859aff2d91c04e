"""A missing or malformed setting stops start-up with one clear line per problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ConfigError, settings_from_env


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
        [sys.executable, "-m", "app.cli", "verify"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "tally: configuration error: TALLY_API_KEYS: every token must be at least 16 characters long"
    )
