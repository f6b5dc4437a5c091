"""Entries can be unlisted: users the directory holds (their memberships still decide
who shares a room with whom) but never returns, such as the appservice's own sender,
other appservices' exclusive users, support, deactivated or locked local users, and
users whose public profile opts out of the directory.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("user_directory") as batch:
        batch.add_column(sa.Column("listed", sa.Boolean, nullable=False, server_default=sa.true()))
        # Why an entry is unlisted ("sender", "namespace", "excluded", "support",
        # "deactivated", "locked", "opted-out"; directory/listing.py), for `explain`;
        # NULL while listed.
        batch.add_column(sa.Column("unlisted_reason", sa.String(32)))
        # What the last fetch learnt that may unlist the user, kept so a change of
        # configuration can be applied without fetching again: the public profile's
        # MSC4258 m.user_directory.visibility (a known value, or NULL), and for local
        # users what Synapse's admin API said ("deactivated", "support", "locked", or
        # NULL: a normal account, or never asked).
        batch.add_column(sa.Column("profile_visibility", sa.String(32)))
        batch.add_column(sa.Column("account_status", sa.String(16)))


def downgrade() -> None:
    with op.batch_alter_table("user_directory") as batch:
        batch.drop_column("account_status")
        batch.drop_column("profile_visibility")
        batch.drop_column("unlisted_reason")
        batch.drop_column("listed")
