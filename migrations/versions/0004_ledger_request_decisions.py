"""ledger requests store the decision (entry or refusal), not an HTTP status and body

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 17:40:00
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

requests = sa.table(
    "ledger_requests",
    sa.column("id", sa.BigInteger()),
    sa.column("status_code", sa.Integer()),
    sa.column("response", sa.JSON()),
    sa.column("refusal_code", sa.String(64)),
    sa.column("refusal_message", sa.Text()),
)


def upgrade() -> None:
    with op.batch_alter_table("ledger_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("refusal_code", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("refusal_message", sa.Text(), nullable=True))
    connection = op.get_bind()
    refused = connection.execute(
        sa.select(requests.c.id, requests.c.response).where(requests.c.status_code != 201)).all()
    for row_id, response in refused:
        connection.execute(requests.update().where(requests.c.id == row_id).values(
            refusal_code=(response or {}).get("code", "refused"), refusal_message=(response or {}).get("message")))
    with op.batch_alter_table("ledger_requests", schema=None) as batch_op:
        batch_op.drop_column("response")
        batch_op.drop_column("status_code")


def downgrade() -> None:
    """The old columns come back; a body can only be rebuilt for refusals, so accepted rows keep a stub."""
    with op.batch_alter_table("ledger_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_code", sa.Integer(), nullable=False, server_default="201"))
        batch_op.add_column(sa.Column("response", sa.JSON(), nullable=False, server_default="{}"))
    connection = op.get_bind()
    refused = connection.execute(
        sa.select(requests.c.id, requests.c.refusal_code, requests.c.refusal_message)
        .where(requests.c.refusal_code.is_not(None))).all()
    for row_id, code, message in refused:
        connection.execute(requests.update().where(requests.c.id == row_id).values(
            status_code=400, response={"code": code, "message": message}))
    with op.batch_alter_table("ledger_requests", schema=None) as batch_op:
        batch_op.alter_column("status_code", server_default=None)
        batch_op.alter_column("response", server_default=None)
        batch_op.drop_column("refusal_message")
        batch_op.drop_column("refusal_code")
