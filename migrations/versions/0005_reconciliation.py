"""reconciliation runs, their drift, and the ids a running run has seen

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 09:00:00
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "reconciliation_runs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("scheduled_for", sa.String(length=10), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("checked", sa.BigInteger(), nullable=False),
        sa.Column("matched", sa.BigInteger(), nullable=False),
        sa.Column("repaired", sa.BigInteger(), nullable=False),
        sa.Column("drifted", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("api_calls", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_runs")),
        sa.UniqueConstraint("provider", "scheduled_for", name=op.f("uq_reconciliation_runs_provider_scheduled_for")),
    )
    op.create_table(
        "reconciliation_drifts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("run_id", BigId, nullable=False),
        sa.Column("object_type", sa.String(length=64), nullable=False),
        sa.Column("object_id", sa.String(length=255), nullable=False),
        sa.Column("field", sa.String(length=64), nullable=False),
        sa.Column("tally_value", sa.Text(), nullable=True),
        sa.Column("provider_value", sa.Text(), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["reconciliation_runs.id"], name=op.f("fk_reconciliation_drifts_run_id_reconciliation_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_drifts")),
    )
    op.create_index("ix_reconciliation_drifts_run_id", "reconciliation_drifts", ["run_id", "id"], unique=False)
    op.create_table(
        "reconciliation_seen",
        sa.Column("run_id", BigId, nullable=False),
        sa.Column("object_id", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["reconciliation_runs.id"], name=op.f("fk_reconciliation_seen_run_id_reconciliation_runs")
        ),
        sa.PrimaryKeyConstraint("run_id", "object_id", name=op.f("pk_reconciliation_seen")),
    )


def downgrade() -> None:
    op.drop_table("reconciliation_seen")
    op.drop_index("ix_reconciliation_drifts_run_id", table_name="reconciliation_drifts")
    op.drop_table("reconciliation_drifts")
    op.drop_table("reconciliation_runs")
