"""Tables. The schema itself is created only by Alembic (alembic/versions/).

Times are integer milliseconds since the epoch (as Synapse stores them): the same on
SQLite and PostgreSQL, and compared against a clock passed in by the caller.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
    true,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    }
)

# Rooms we have heard of. A room is *visible* while at least one local user is joined:
# only then does our homeserver receive its events, so only then do we know its members.
rooms = Table(
    "rooms",
    metadata,
    Column("room_id", String(255), primary_key=True),
    Column("join_rule", String(64)),
    Column("history_visibility", String(64)),
    Column("is_public", Boolean, nullable=False, server_default=false()),
    Column("is_visible", Boolean, nullable=False, server_default=false()),
    # Set while the room's existing members are unknown (our server just joined it):
    # the local member to read them as. Cleared by the backfill.
    Column("backfill_as", String(255)),
    # Bumped by every batch touching the room, so a backfill can tell whether its
    # snapshot (read over HTTP, outside any transaction) went stale.
    Column("member_events", BigInteger, nullable=False, server_default="0"),
    # When a snapshot last confirmed the room's members and publicity, and when
    # reconciliation reads it again (NULL: never checked, so first in line).
    Column("checked_at_ms", BigInteger),
    Column("recheck_due_ms", BigInteger),
    Index("ix_rooms_backfill_as", "backfill_as"),
    Index("ix_rooms_recheck_due_ms", "is_visible", "recheck_due_ms"),
)

# Current joined members of each room, as the events told us. Only joins are stored;
# any other membership removes the row. displayname/avatar_url are the member event's
# (possibly per-room) values: private, never shown, kept only to tell a change in this
# room from a replay of what we already saw.
room_members = Table(
    "room_members",
    metadata,
    Column("room_id", String(255), primary_key=True),
    Column("user_id", String(255), primary_key=True),
    Column("is_local", Boolean, nullable=False),
    Column("displayname", Text),
    Column("avatar_url", Text),
    Index("ix_room_members_user_id", "user_id"),
)

# One entry per user joined to at least one visible room. display_name/avatar_url only
# ever hold a fetched PUBLIC profile (or nothing: the placeholder). The seen_* columns
# remember the last profile values the events carried, to deduplicate fetch triggers.
user_directory = Table(
    "user_directory",
    metadata,
    Column("user_id", String(255), primary_key=True),
    Column("server_name", String(255), nullable=False),
    Column("display_name", Text),
    Column("avatar_url", Text),
    Column("fetched_at_ms", BigInteger),
    Column("refresh_due_ms", BigInteger, nullable=False),
    Column("in_public_room", Boolean, nullable=False, server_default=false()),
    # Derived from user id and display name by directory.text, for matching and ranking:
    # the words of both (space separated), the normalised localpart and name.
    Column("search_words", Text, nullable=False),
    Column("localpart_key", String(255), nullable=False),
    Column("name_key", Text),
    Column("seen_displayname", Text),
    Column("seen_avatar_url", Text),
    Column("seen_room_id", String(255)),
    Column("seen_elsewhere", Boolean, nullable=False, server_default=false()),
    Column("seen_per_room", Boolean, nullable=False, server_default=false()),
    # Fetches that found the seen value per-room, and when the last answered (dedup).
    Column("seen_checks", Integer, nullable=False, server_default="0"),
    Column("seen_checked_at_ms", BigInteger),
    Column("created_at_ms", BigInteger, nullable=False),
    # The pending-fetch generation whose answer the entry shows: an older answer
    # arriving late (a fetch in flight across a leave and a rejoin) is not applied.
    Column("fetched_generation", BigInteger),
    # False for users held but never returned by search (directory/listing.py says
    # which); unlisted_reason says why. profile_visibility (MSC4258) and account_status
    # (Synapse's admin API) are what fetches learnt that may unlist the user, kept so
    # the listing can be judged again when the configuration changes.
    Column("listed", Boolean, nullable=False, server_default=true()),
    Column("unlisted_reason", String(32)),
    Column("profile_visibility", String(32)),
    Column("account_status", String(16)),
    Index("ix_user_directory_refresh_due_ms", "refresh_due_ms"),
    Index("ix_user_directory_server_name", "server_name"),
)

# The outbox: users whose public profile must be fetched. A row is due when
# next_attempt_ms <= now; NULL means we gave up (until the next trigger or refresh).
# Every trigger takes a new generation from one counter that never goes back
# (storage.pending.allocate_generations), so a fetch that started before it, even
# before the user left and came back, neither clears the row nor counts against it.
pending_fetches = Table(
    "pending_fetches",
    metadata,
    Column(
        "user_id",
        String(255),
        ForeignKey("user_directory.user_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("server_name", String(255), nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_ms", BigInteger),
    Column("reason", String(32), nullable=False),
    Column("last_error", Text),
    Column("queued_at_ms", BigInteger, nullable=False),
    Index("ix_pending_fetches_server_name_next_attempt_ms", "server_name", "next_attempt_ms"),
    Index("ix_pending_fetches_next_attempt_ms", "next_attempt_ms"),
)

# Health of each remote server, shared by all its users.
destinations = Table(
    "destinations",
    metadata,
    Column("server_name", String(255), primary_key=True),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    Column("retry_after_ms", BigInteger),
    Column("last_success_ms", BigInteger),
    Column("last_failure_ms", BigInteger),
    Column("last_error", Text),
)

# Appservice transactions already processed: the homeserver retries a transaction until
# it gets a 200, and a replay must not be processed twice.
appservice_transactions = Table(
    "appservice_transactions",
    metadata,
    Column("txn_id", String(255), primary_key=True),
    Column("received_at_ms", BigInteger, nullable=False),
    Column("events", Integer, nullable=False),
    Index("ix_appservice_transactions_received_at_ms", "received_at_ms"),
)

# Transactions accepted from the homeserver and not applied yet, oldest first. Accepting
# is one INSERT, so the homeserver gets its 200 as soon as the events are durable; one
# consumer at a time applies them in order, many transactions per database transaction.
event_inbox = Table(
    "event_inbox",
    metadata,
    # SQLite only auto-increments an INTEGER PRIMARY KEY.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("received_at_ms", BigInteger, nullable=False),
    Column("events", Integer, nullable=False),
    # The transaction's `events` array, or a room snapshot (kind "snapshot", see
    # directory/snapshots.py): zlib-compressed JSON (directory/jsoncodec.py).
    Column("payload", LargeBinary, nullable=False),
    Column("kind", String(16), nullable=False, server_default="events"),
)

# Named counters that never go back. SQLite has no sequences: the pending-fetch
# generation counter lives here there (PostgreSQL uses a real sequence).
sequences = Table(
    "sequences",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# Running totals written in the transactions that do the work (repairs, snapshots
# applied or refused), so every process's work adds up and /metrics reads one place.
counters = Table(
    "counters",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# Loading a homeserver that already has rooms (directory/bootstrap.py). One run is
# active at a time; its listing resumes from list_cursor, its rooms from their state.
bootstrap_runs = Table(
    "bootstrap_runs",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    # "admin" (Synapse's admin room list) or "users" (each listed user's joined rooms).
    Column("source", String(16), nullable=False),
    # 1 while unfinished, NULL after: a unique index keeps one run active at a time.
    Column("active", Integer),
    Column("started_at_ms", BigInteger, nullable=False),
    Column("listed_at_ms", BigInteger),
    Column("finished_at_ms", BigInteger),
    Column("list_cursor", Text),
    # The homeserver's own count of rooms (admin listing), for the progress estimate.
    Column("rooms_reported", BigInteger),
    Column("last_error", Text),
    Column("last_error_at_ms", BigInteger),
    Index("ix_bootstrap_runs_active", "active", unique=True),
)

# A room of a bootstrap run: "listed" (to read; claimed while next_attempt_ms is in
# the future), "read" (its snapshot waits in the inbox), "loaded" or "failed".
bootstrap_rooms = Table(
    "bootstrap_rooms",
    metadata,
    Column(
        "run_id",
        BigInteger,
        ForeignKey("bootstrap_runs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("room_id", String(255), primary_key=True),
    # The local user to read it as; NULL reads it with the admin API.
    Column("read_as", String(255)),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_ms", BigInteger, nullable=False),
    Column("members", Integer),
    Column("last_error", Text),
    Column("updated_at_ms", BigInteger, nullable=False),
    Index("ix_bootstrap_rooms_run_id_state", "run_id", "state", "next_attempt_ms"),
)

# The local users of a run listed from --users-file, in file order.
bootstrap_users = Table(
    "bootstrap_users",
    metadata,
    Column(
        "run_id",
        BigInteger,
        ForeignKey("bootstrap_runs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("user_id", String(255), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("listed", Boolean, nullable=False, server_default=false()),
    Column("last_error", Text),
)
