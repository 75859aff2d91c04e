"""dodo mirror: provider ledger entries, subscription carts and meters, alerts, payments

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 03:15:04.143993
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op



revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Reviewed by hand: new tables only; nothing existing changes.
    op.create_table('provider_payments',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('object_id', sa.String(length=255), nullable=False),
    sa.Column('payment_id', sa.String(length=255), nullable=True),
    sa.Column('customer_id', sa.String(length=255), nullable=True),
    sa.Column('subscription_id', sa.String(length=255), nullable=True),
    sa.Column('status', sa.String(length=64), nullable=True),
    sa.Column('amount', sa.BigInteger(), nullable=True),
    sa.Column('currency', sa.String(length=8), nullable=True),
    sa.Column('last_event_type', sa.String(length=255), nullable=False),
    sa.Column('watermark_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('provider_created_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_provider_payments')),
    sa.UniqueConstraint('provider', 'object_id', name=op.f('uq_provider_payments_provider_object_id'))
    )
    with op.batch_alter_table('provider_payments', schema=None) as batch_op:
        batch_op.create_index('ix_provider_payments_customer_id', ['customer_id'], unique=False)

    op.create_table('credit_alerts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('inbox_event_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('customer_id', sa.String(length=255), nullable=False),
    sa.Column('subscription_id', sa.String(length=255), nullable=True),
    sa.Column('entitlement_id', sa.String(length=255), nullable=False),
    sa.Column('entitlement_name', sa.String(length=255), nullable=True),
    sa.Column('available_balance', sa.String(length=64), nullable=False),
    sa.Column('subscription_credits_amount', sa.String(length=64), nullable=True),
    sa.Column('threshold_percent', sa.Integer(), nullable=True),
    sa.Column('threshold_amount', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['inbox_event_id'], ['inbox_events.id'], name=op.f('fk_credit_alerts_inbox_event_id_inbox_events')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_credit_alerts')),
    sa.UniqueConstraint('inbox_event_id', name=op.f('uq_credit_alerts_inbox_event_id'))
    )
    with op.batch_alter_table('credit_alerts', schema=None) as batch_op:
        batch_op.create_index('ix_credit_alerts_customer_id', ['customer_id'], unique=False)

    op.create_table('provider_entitlements',
    sa.Column('entitlement_id', sa.String(length=255), nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('display_precision', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['entitlement_id'], ['credit_entitlements.id'], name=op.f('fk_provider_entitlements_entitlement_id_credit_entitlements')),
    sa.PrimaryKeyConstraint('entitlement_id', name=op.f('pk_provider_entitlements'))
    )
    op.create_table('subscription_credits',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('subscription_id', sa.String(length=255), nullable=False),
    sa.Column('entitlement_id', sa.String(length=255), nullable=False),
    sa.Column('product_id', sa.String(length=255), nullable=True),
    sa.Column('credits_amount', sa.BigInteger(), nullable=False),
    sa.Column('overage_enabled', sa.Boolean(), nullable=False),
    sa.Column('overage_limit', sa.BigInteger(), nullable=True),
    sa.Column('overage_behavior', sa.String(length=64), nullable=True),
    sa.Column('rollover_enabled', sa.Boolean(), nullable=False),
    sa.Column('reported_balance', sa.BigInteger(), nullable=True),
    sa.Column('reported_overage', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['entitlement_id'], ['credit_entitlements.id'], name=op.f('fk_subscription_credits_entitlement_id_credit_entitlements')),
    sa.ForeignKeyConstraint(['subscription_id'], ['subscriptions.id'], name=op.f('fk_subscription_credits_subscription_id_subscriptions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscription_credits')),
    sa.UniqueConstraint('subscription_id', 'entitlement_id', name=op.f('uq_subscription_credits_subscription_id_entitlement_id'))
    )
    op.create_table('subscription_meter_credits',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('subscription_id', sa.String(length=255), nullable=False),
    sa.Column('meter_id', sa.String(length=255), nullable=False),
    sa.Column('entitlement_id', sa.String(length=255), nullable=False),
    sa.Column('meter_name', sa.String(length=255), nullable=True),
    sa.Column('meter_units_per_credit', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['subscription_id'], ['subscriptions.id'], name=op.f('fk_subscription_meter_credits_subscription_id_subscriptions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscription_meter_credits')),
    sa.UniqueConstraint('subscription_id', 'meter_id', 'entitlement_id', name='uq_subscription_meter_credits_key')
    )
    op.create_table('subscription_meters',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('subscription_id', sa.String(length=255), nullable=False),
    sa.Column('meter_id', sa.String(length=255), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('currency', sa.String(length=8), nullable=True),
    sa.Column('free_threshold', sa.BigInteger(), nullable=False),
    sa.Column('measurement_unit', sa.String(length=255), nullable=True),
    sa.Column('price_per_unit', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['subscription_id'], ['subscriptions.id'], name=op.f('fk_subscription_meters_subscription_id_subscriptions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscription_meters')),
    sa.UniqueConstraint('subscription_id', 'meter_id', name=op.f('uq_subscription_meters_subscription_id_meter_id'))
    )
    op.create_table('provider_ledger_entries',
    sa.Column('ledger_entry_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('balance_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('external_id', sa.String(length=255), nullable=False),
    sa.Column('transaction_type', sa.String(length=64), nullable=False),
    sa.Column('is_credit', sa.Boolean(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('provider_grant_id', sa.String(length=255), nullable=True),
    sa.Column('reference_type', sa.String(length=255), nullable=True),
    sa.Column('reference_id', sa.String(length=255), nullable=True),
    sa.Column('extra', sa.JSON(), nullable=True),
    sa.Column('chain_position', sa.BigInteger(), nullable=False),
    sa.Column('follows_gap', sa.Boolean(), nullable=False),
    sa.Column('expected_balance_before', sa.BigInteger(), nullable=True),
    sa.Column('expected_overage_before', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['balance_id'], ['balances.id'], name=op.f('fk_provider_ledger_entries_balance_id_balances')),
    sa.ForeignKeyConstraint(['ledger_entry_id'], ['ledger_entries.id'], name=op.f('fk_provider_ledger_entries_ledger_entry_id_ledger_entries')),
    sa.PrimaryKeyConstraint('ledger_entry_id', name=op.f('pk_provider_ledger_entries')),
    sa.UniqueConstraint('provider', 'external_id', name=op.f('uq_provider_ledger_entries_provider_external_id'))
    )
    with op.batch_alter_table('provider_ledger_entries', schema=None) as batch_op:
        batch_op.create_index('ix_provider_ledger_entries_balance_id_follows_gap', ['balance_id', 'follows_gap'], unique=False)



def downgrade() -> None:
    # Drop in dependency order: the provider entries reference ledger entries and balances.
    with op.batch_alter_table('provider_ledger_entries', schema=None) as batch_op:
        batch_op.drop_index('ix_provider_ledger_entries_balance_id_follows_gap')

    op.drop_table('provider_ledger_entries')
    op.drop_table('subscription_meters')
    op.drop_table('subscription_meter_credits')
    op.drop_table('subscription_credits')
    op.drop_table('provider_entitlements')
    with op.batch_alter_table('credit_alerts', schema=None) as batch_op:
        batch_op.drop_index('ix_credit_alerts_customer_id')

    op.drop_table('credit_alerts')
    with op.batch_alter_table('provider_payments', schema=None) as batch_op:
        batch_op.drop_index('ix_provider_payments_customer_id')

    op.drop_table('provider_payments')
