"""Appservice transaction ids (replays answer 200 without reprocessing) and rooms
waiting for a member backfill.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "appservice_transactions",
        sa.Column("txn_id", sa.String(255), nullable=False),
        sa.Column("received_at_ms", sa.BigInteger, nullable=False),
        sa.Column("events", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("txn_id", name="pk_appservice_transactions"),
    )
    # Old ids are pruned by age.
    op.create_index(
        "ix_appservice_transactions_received_at_ms", "appservice_transactions", ["received_at_ms"]
    )
    with op.batch_alter_table("rooms") as batch:
        # A local member to read the room as, while its existing members are unknown.
        batch.add_column(sa.Column("backfill_as", sa.String(255)))
        # Bumped by every batch touching the room: a backfill whose snapshot was read
        # before a bump is stale and is read again.
        batch.add_column(
            sa.Column("member_events", sa.BigInteger, nullable=False, server_default="0")
        )
    op.create_index(
        "ix_rooms_backfill_as",
        "rooms",
        ["backfill_as"],
        postgresql_where=sa.text("backfill_as IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_rooms_backfill_as", "rooms")
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("member_events")
        batch.drop_column("backfill_as")
    op.drop_table("appservice_transactions")
