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
    Index("ix_rooms_backfill_as", "backfill_as"),
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
    Column("created_at_ms", BigInteger, nullable=False),
    Index("ix_user_directory_refresh_due_ms", "refresh_due_ms"),
    Index("ix_user_directory_server_name", "server_name"),
)

# The outbox: users whose public profile must be fetched. A row is due when
# next_attempt_ms <= now; NULL means we gave up (until the next trigger or refresh).
# Every new trigger bumps generation, so a fetch that started before it does not
# clear the row when it finishes.
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
    Column("generation", Integer, nullable=False),
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
    # The transaction's `events` array: zlib-compressed JSON (directory/jsoncodec.py).
    Column("payload", LargeBinary, nullable=False),
)
