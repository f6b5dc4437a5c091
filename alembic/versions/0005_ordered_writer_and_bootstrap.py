"""One ordered writer, generations that never repeat, room rechecks and the bootstrap.

- event_inbox.kind: the inbox now also carries room snapshots (backfill, bootstrap,
  reconciliation), applied by the one consumer in order with the events around them.
- rooms.checked_at_ms / recheck_due_ms: when a snapshot last confirmed the room, and
  when reconciliation reads it again.
- pending_fetches.generation becomes a BIGINT drawn from one counter that never goes
  back (a sequence on PostgreSQL, a row of `sequences` on SQLite), so a user who left
  and came back gets generations no fetch in flight can hold;
  user_directory.fetched_generation is the generation of the answer an entry shows.
- counters: running totals shared by every process (repairs, snapshots), for /metrics.
- bootstrap_runs / bootstrap_rooms / bootstrap_users: the durable state of loading a
  homeserver that already has rooms.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

GENERATION_SEQUENCE = "pending_fetch_generation"


def upgrade() -> None:
    bind = op.get_bind()
    postgresql = bind.dialect.name == "postgresql"

    with op.batch_alter_table("event_inbox") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="events"))

    with op.batch_alter_table("rooms") as batch:
        batch.add_column(sa.Column("checked_at_ms", sa.BigInteger))
        batch.add_column(sa.Column("recheck_due_ms", sa.BigInteger))
    # Reconciliation: the visible rooms whose check is oldest (never checked first).
    op.create_index("ix_rooms_recheck_due_ms", "rooms", ["is_visible", "recheck_due_ms"])

    with op.batch_alter_table("pending_fetches") as batch:
        batch.alter_column("generation", type_=sa.BigInteger, existing_nullable=False)
    with op.batch_alter_table("user_directory") as batch:
        batch.add_column(sa.Column("fetched_generation", sa.BigInteger))

    op.create_table(
        "sequences",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_sequences"),
    )
    start = bind.scalar(sa.text("SELECT COALESCE(MAX(generation), 0) + 1 FROM pending_fetches"))
    if postgresql:
        op.execute(f"CREATE SEQUENCE {GENERATION_SEQUENCE} AS bigint START WITH {int(start)}")
    else:
        op.execute(
            sa.text("INSERT INTO sequences (name, value) VALUES (:name, :value)").bindparams(
                name=GENERATION_SEQUENCE, value=int(start) - 1
            )
        )

    op.create_table(
        "counters",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_counters"),
    )

    op.create_table(
        "bootstrap_runs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("source", sa.String(16), nullable=False),
        # 1 while the run is unfinished, NULL after: the unique index allows one at a time.
        sa.Column("active", sa.Integer),
        sa.Column("started_at_ms", sa.BigInteger, nullable=False),
        sa.Column("listed_at_ms", sa.BigInteger),
        sa.Column("finished_at_ms", sa.BigInteger),
        sa.Column("list_cursor", sa.Text),
        sa.Column("rooms_reported", sa.BigInteger),
        sa.Column("last_error", sa.Text),
        sa.Column("last_error_at_ms", sa.BigInteger),
        sa.PrimaryKeyConstraint("id", name="pk_bootstrap_runs"),
    )
    op.create_index("ix_bootstrap_runs_active", "bootstrap_runs", ["active"], unique=True)
    op.create_table(
        "bootstrap_rooms",
        sa.Column("run_id", sa.BigInteger, nullable=False),
        sa.Column("room_id", sa.String(255), nullable=False),
        sa.Column("read_as", sa.String(255)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_ms", sa.BigInteger, nullable=False),
        sa.Column("members", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "room_id", name="pk_bootstrap_rooms"),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["bootstrap_runs.id"],
            name="fk_bootstrap_rooms_run_id_bootstrap_runs",
            ondelete="CASCADE",
        ),
    )
    # Loaders claim the due rooms of a run; progress counts rooms per state.
    op.create_index(
        "ix_bootstrap_rooms_run_id_state",
        "bootstrap_rooms",
        ["run_id", "state", "next_attempt_ms"],
    )
    op.create_table(
        "bootstrap_users",
        sa.Column("run_id", sa.BigInteger, nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("listed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("last_error", sa.Text),
        sa.PrimaryKeyConstraint("run_id", "user_id", name="pk_bootstrap_users"),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["bootstrap_runs.id"],
            name="fk_bootstrap_users_run_id_bootstrap_runs",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("bootstrap_users")
    op.drop_table("bootstrap_rooms")
    op.drop_index("ix_bootstrap_runs_active", "bootstrap_runs")
    op.drop_table("bootstrap_runs")
    op.drop_table("counters")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP SEQUENCE {GENERATION_SEQUENCE}")
    op.drop_table("sequences")
    with op.batch_alter_table("user_directory") as batch:
        batch.drop_column("fetched_generation")
    with op.batch_alter_table("pending_fetches") as batch:
        batch.alter_column("generation", type_=sa.Integer, existing_nullable=False)
    op.drop_index("ix_rooms_recheck_due_ms", "rooms")
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("recheck_due_ms")
        batch.drop_column("checked_at_ms")
    with op.batch_alter_table("event_inbox") as batch:
        batch.drop_column("kind")
