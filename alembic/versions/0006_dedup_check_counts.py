"""Deduplication remembers how often a value was found per-room and when it was last
checked, so a value the profile never returns costs a bounded number of requests
however many rooms echo it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("user_directory") as batch:
        batch.add_column(sa.Column("seen_checks", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("seen_checked_at_ms", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("user_directory") as batch:
        batch.drop_column("seen_checked_at_ms")
        batch.drop_column("seen_checks")
