"""Initial schema: rooms, memberships, directory entries, pending fetches, destinations.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rooms",
        sa.Column("room_id", sa.String(255), primary_key=True),
        sa.Column("join_rule", sa.String(64)),
        sa.Column("history_visibility", sa.String(64)),
        sa.Column("is_public", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("is_visible", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("room_id", name="pk_rooms"),
    )
    op.create_table(
        "room_members",
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("is_local", sa.Boolean, nullable=False),
        sa.Column("displayname", sa.Text),
        sa.Column("avatar_url", sa.Text),
        sa.PrimaryKeyConstraint("room_id", "user_id", name="pk_room_members"),
    )
    # "Which rooms is this user in?" for visibility and the searcher's shared rooms.
    op.create_index("ix_room_members_user_id", "room_members", ["user_id"])

    op.create_table(
        "user_directory",
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("server_name", sa.String(255), nullable=False),
        sa.Column("display_name", sa.Text),
        sa.Column("avatar_url", sa.Text),
        sa.Column("fetched_at_ms", sa.BigInteger),
        sa.Column("refresh_due_ms", sa.BigInteger, nullable=False),
        sa.Column("in_public_room", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("search_words", sa.Text, nullable=False),
        sa.Column("localpart_key", sa.String(255), nullable=False),
        sa.Column("name_key", sa.Text),
        sa.Column("seen_displayname", sa.Text),
        sa.Column("seen_avatar_url", sa.Text),
        sa.Column("seen_room_id", sa.String(255)),
        sa.Column("seen_elsewhere", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("seen_per_room", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_directory"),
    )
    # Scheduled refresh picks the oldest entries first.
    op.create_index("ix_user_directory_refresh_due_ms", "user_directory", ["refresh_due_ms"])
    # A destination coming back revives its users.
    op.create_index("ix_user_directory_server_name", "user_directory", ["server_name"])
    if op.get_bind().dialect.name == "postgresql":
        # Word-prefix search ("ali:*") through a GIN index instead of a scan.
        op.execute(
            "CREATE INDEX ix_user_directory_search_words ON user_directory "
            "USING gin (to_tsvector('simple', search_words))"
        )

    op.create_table(
        "pending_fetches",
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("server_name", sa.String(255), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_ms", sa.BigInteger),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("queued_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_pending_fetches"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user_directory.user_id"],
            name="fk_pending_fetches_user_id_user_directory",
            ondelete="CASCADE",
        ),
    )
    # Claiming: the due users of one destination, oldest first.
    op.create_index(
        "ix_pending_fetches_server_name_next_attempt_ms",
        "pending_fetches",
        ["server_name", "next_attempt_ms"],
    )
    # Reconciliation: everything due, across destinations.
    op.create_index("ix_pending_fetches_next_attempt_ms", "pending_fetches", ["next_attempt_ms"])

    op.create_table(
        "destinations",
        sa.Column("server_name", sa.String(255), nullable=False),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("retry_after_ms", sa.BigInteger),
        sa.Column("last_success_ms", sa.BigInteger),
        sa.Column("last_failure_ms", sa.BigInteger),
        sa.Column("last_error", sa.Text),
        sa.PrimaryKeyConstraint("server_name", name="pk_destinations"),
    )


def downgrade() -> None:
    op.drop_table("destinations")
    op.drop_table("pending_fetches")
    op.drop_table("user_directory")
    op.drop_table("room_members")
    op.drop_table("rooms")
