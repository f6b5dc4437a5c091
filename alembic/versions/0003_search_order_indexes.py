"""Search order indexes (PostgreSQL): each ranking tier is one index range, read in
its final order and cut at limit + 1, so a short popular prefix costs the same at 1M
entries as at 10k (see directory/search.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from alembic import op

# directory.search.NAME_ORDER_CHARS when this was written; a migration keeps its own
# copy so that changing the constant later does not rewrite history.
NAME_ORDER_CHARS = 128

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    no_profile = "(display_name IS NULL AND avatar_url IS NULL)"
    op.execute(
        "CREATE INDEX ix_user_directory_name_order ON user_directory (in_public_room, "
        f'{no_profile}, (left(name_key, {NAME_ORDER_CHARS}) COLLATE "C"), '
        '(localpart_key COLLATE "C"), (user_id COLLATE "C"))'
    )
    op.execute(
        "CREATE INDEX ix_user_directory_localpart_order ON user_directory (in_public_room, "
        f'{no_profile}, (localpart_key COLLATE "C"), (user_id COLLATE "C"))'
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX ix_user_directory_localpart_order")
    op.execute("DROP INDEX ix_user_directory_name_order")
