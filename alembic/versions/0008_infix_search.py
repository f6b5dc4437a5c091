"""Infix search (PostgreSQL): trigram indexes on the normalised display name and
localpart, so that a term of 3+ characters finds the names and localparts that
contain it ("lex" finds "Alex", tier 5 of directory/search.py) without reading the
whole directory. pg_trgm ships with PostgreSQL (contrib) and is a trusted extension:
the database's owner may create it.

SQLite needs nothing: it matches infixes by scanning, as it matches everything.
Built inside alembic's transaction, so not CONCURRENTLY: the table is locked against
writes while the indexes build (about a minute per million entries).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.execute(
        "CREATE INDEX ix_user_directory_name_key_trgm ON user_directory "
        "USING gin (name_key gin_trgm_ops)"
    )
    op.execute(
        "CREATE INDEX ix_user_directory_localpart_key_trgm ON user_directory "
        "USING gin (localpart_key gin_trgm_ops)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX ix_user_directory_localpart_key_trgm")
    op.execute("DROP INDEX ix_user_directory_name_key_trgm")
    # The extension stays: other objects may use it, and it costs nothing unused.
