"""usage metering: usage events, meter aggregates, ledger request idempotency

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 03:14:34.695624
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op



revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('meter_usage',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('customer_id', sa.String(length=255), nullable=False),
    sa.Column('meter_key', sa.String(length=255), nullable=False),
    sa.Column('entitlement_id', sa.String(length=255), nullable=False),
    sa.Column('period_key', sa.String(length=64), nullable=False),
    sa.Column('subscription_id', sa.String(length=255), nullable=True),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('period_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('event_count', sa.BigInteger(), nullable=False),
    sa.Column('consumed', sa.String(length=80), nullable=False),
    sa.Column('last_timestamp', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_event_id', sa.String(length=255), nullable=True),
    sa.Column('charged', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_meter_usage_customer_id_customers')),
    sa.ForeignKeyConstraint(['entitlement_id'], ['credit_entitlements.id'], name=op.f('fk_meter_usage_entitlement_id_credit_entitlements')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_meter_usage')),
    sa.UniqueConstraint('customer_id', 'meter_key', 'period_key', name=op.f('uq_meter_usage_customer_id_meter_key_period_key'))
    )
    with op.batch_alter_table('meter_usage', schema=None) as batch_op:
        batch_op.create_index('ix_meter_usage_subscription_id_period_start', ['subscription_id', 'period_start'], unique=False)

    op.create_table('usage_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=255), nullable=False),
    sa.Column('customer_id', sa.String(length=255), nullable=False),
    sa.Column('event_name', sa.String(length=255), nullable=False),
    sa.Column('timestamp', sa.DateTime(timezone=True), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('refusal_code', sa.String(length=64), nullable=True),
    sa.Column('refusal_message', sa.Text(), nullable=True),
    sa.Column('applied_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_usage_events_customer_id_customers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_events')),
    sa.UniqueConstraint('event_id', name=op.f('uq_usage_events_event_id'))
    )
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.create_index('ix_usage_events_customer_id_timestamp', ['customer_id', 'timestamp'], unique=False)
        batch_op.create_index('ix_usage_events_status_received_at', ['status', 'received_at'], unique=False)

    op.create_table('ledger_requests',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('entitlement_id', sa.String(length=255), nullable=False),
    sa.Column('customer_id', sa.String(length=255), nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('response', sa.JSON(), nullable=False),
    sa.Column('ledger_entry_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_ledger_requests_customer_id_customers')),
    sa.ForeignKeyConstraint(['entitlement_id'], ['credit_entitlements.id'], name=op.f('fk_ledger_requests_entitlement_id_credit_entitlements')),
    sa.ForeignKeyConstraint(['ledger_entry_id'], ['ledger_entries.id'], name=op.f('fk_ledger_requests_ledger_entry_id_ledger_entries')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_requests')),
    sa.UniqueConstraint('entitlement_id', 'customer_id', 'idempotency_key', name=op.f('uq_ledger_requests_entitlement_id_customer_id_idempotency_key'))
    )


def downgrade() -> None:
    op.drop_table('ledger_requests')
    with op.batch_alter_table('usage_events', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_events_status_received_at')
        batch_op.drop_index('ix_usage_events_customer_id_timestamp')

    op.drop_table('usage_events')
    with op.batch_alter_table('meter_usage', schema=None) as batch_op:
        batch_op.drop_index('ix_meter_usage_subscription_id_period_start')

    op.drop_table('meter_usage')
