"""The event inbox: accepted appservice transactions waiting to be applied in order.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "event_inbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("received_at_ms", sa.BigInteger, nullable=False),
        sa.Column("events", sa.Integer, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_event_inbox"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Payloads arrive compressed: no second compression attempt, and rows up to a
        # page stay inline rather than being split into TOAST chunks.
        op.execute("ALTER TABLE event_inbox ALTER COLUMN payload SET STORAGE EXTERNAL")
        op.execute("ALTER TABLE event_inbox SET (toast_tuple_target = 8160)")


def downgrade() -> None:
    op.drop_table("event_inbox")
