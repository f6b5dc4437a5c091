"""Scheduled upkeep: refresh old profiles, recheck rooms, repair orphaned entries.

Each runs from beat; each is one short transaction and safe to run twice.
"""

from __future__ import annotations

from sqlalchemy import Connection

from directory.config import Settings
from directory.events import server_name_of
from directory.membership import next_refresh_ms
from directory.storage import entries, pending
from directory.storage import rooms as room_store

# A room taken for a recheck is not taken again before this, unless its snapshot
# lands first (then it is due ROOM_RECHECK_SECONDS later): a lost read is retried.
RECHECK_LEASE_MS = 600_000


def queue_refreshes(conn: Connection, settings: Settings, now: int) -> set[str]:
    """Queue a fetch for the oldest entries past PROFILE_MAX_AGE, a bounded number per
    run so a day's worth spreads out. Returns the destinations to publish work for."""
    users = entries.due_for_refresh(conn, now, settings.refresh_batch_size)
    if not users:
        return set()
    # Pushed forward now, so a refresh that keeps failing is not re-queued (with a
    # fresh attempt budget) on every run.
    entries.postpone_refresh(
        conn, ((user, next_refresh_ms(now, settings.profile_max_age_seconds)) for user in users)
    )
    pending.queue(conn, users, "refresh", now)
    return {server_name_of(user) for user in users}


def prune_orphans(conn: Connection) -> int:
    return entries.delete_orphans(conn)


def take_rooms_to_recheck(conn: Connection, settings: Settings, now: int) -> list[str]:
    """The visible rooms whose check is due, oldest (never checked) first, at most
    ROOM_RECHECK_BATCH; each is leased so the next run does not take it again."""
    rooms = room_store.due_for_recheck(conn, now, settings.room_recheck_batch)
    room_store.postpone_recheck(conn, rooms, now + RECHECK_LEASE_MS)
    return rooms
