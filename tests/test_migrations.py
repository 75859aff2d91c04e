"""The migrations are the schema: they build what the models declare, and they go down and up again."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from app.cli import alembic_config
from app.config import get_settings
from app.models import Base


def scratch_url(tmp_path: Path) -> str:
    url = get_settings().database_url
    if url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/migrations.db"
    base, name = url.rsplit("/", 1)
    scratch = f"{name}_migrations_check"  # beside the test database, so parallel suites never share it
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{scratch}"'))
        connection.execute(text(f'CREATE DATABASE "{scratch}"'))
    engine.dispose()
    return f"{base}/{scratch}"


def test_upgrade_matches_the_models_and_downgrade_reverses_it(tmp_path: Path):
    url = scratch_url(tmp_path)
    config = alembic_config(url)
    command.upgrade(config, "head")
    engine = create_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")
    assert "ledger_entries" in inspect(engine).get_table_names()
    engine.dispose()
