"""Scheduled upkeep: refresh old profiles, repair orphaned entries.

Both run from beat; each is one short transaction and safe to run twice.
"""

from __future__ import annotations

from sqlalchemy import Connection

from directory.config import Settings
from directory.events import server_name_of
from directory.membership import next_refresh_ms
from directory.storage import entries, pending


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
