"""Event-side tasks: applying accepted transactions, and loading the existing members
of a room our server just joined."""

from __future__ import annotations

import logging
import time

from celery import Task
from sqlalchemy.exc import IntegrityError, OperationalError

from directory.backfill import (
    HomeserverUnavailable,
    RoomUnreadable,
    SnapshotStale,
    apply_snapshot,
)
from directory.clock import now_ms
from directory.ingest import apply_accepted
from directory.storage import rooms as room_store
from tasks.app import app
from tasks.outbox import inbox_consumer_started, publish_outcome, wake_inbox_consumer
from tasks.resources import get_resources

logger = logging.getLogger(__name__)

# Retries of an unreachable homeserver: 5 s doubling to 5 min, well under the broker's
# visibility timeout. After the last one the room stays marked in the database and
# reconciliation tries again.
MAX_BACKFILL_RETRIES = 8
MAX_BACKFILL_DELAY_S = 300
# A room busy with member events while we read it is read again at once a few times
# (its burst, e.g. the joins right after its creation, is usually short).
STALE_REREADS = 5
STALE_REREAD_DELAY_S = 0.2
# An inbox consumer run hands over to a fresh task after this long, so a long backlog
# never holds one broker message for long; the queue order is kept by the database.
INBOX_RUN_BUDGET_S = 30.0
MAX_INBOX_RETRY_DELAY_S = 30


def _read_and_apply(room_id: str) -> int | None:
    """One backfill attempt: None if the room changed while we read it."""
    resources = get_resources()
    settings = resources.settings
    with resources.engine.connect() as conn:
        reader = room_store.backfill_reader(conn, room_id)
        if reader is None:
            return 0  # done already (this task ran twice)
        read_after = room_store.member_events(conn, room_id)
        candidates = [reader, *(u for u in room_store.local_members(conn, room_id) if u != reader)]
    snapshot = None
    for as_user in candidates:
        try:
            snapshot = resources.rooms.read(room_id, as_user)
            break
        except RoomUnreadable as exc:
            logger.info("cannot read %s as %s: %s", room_id, as_user, exc)
    try:
        with resources.engine.begin() as conn:
            if snapshot is None:
                # No local member can read it any more: whatever we know stays as
                # events left it, and the mark goes so we stop asking.
                room_store.clear_backfill(conn, room_id)
                return 0
            outcome = apply_snapshot(
                conn,
                room_id,
                snapshot,
                read_after=read_after,
                server_name=settings.server_name,
                now_ms=now_ms(),
                profile_max_age_seconds=settings.profile_max_age_seconds,
            )
    except SnapshotStale:
        return None
    publish_outcome(outcome)
    logger.info(
        "backfilled %s: %d members, %d new entries", room_id, len(snapshot.joined), outcome.created
    )
    return len(snapshot.joined)


@app.task(
    name="tasks.events.backfill_room",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=MAX_BACKFILL_RETRIES,
)
def backfill_room(self: Task, room_id: str) -> int:
    try:
        for _ in range(STALE_REREADS):
            members = _read_and_apply(room_id)
            if members is not None:
                return members
            time.sleep(STALE_REREAD_DELAY_S)
        reason: Exception = SnapshotStale(room_id)
    except (HomeserverUnavailable, OperationalError, IntegrityError) as exc:
        # Unreachable homeserver, or a clash with a concurrent writer: try again later.
        reason = exc
    delay = min(5 * 2**self.request.retries, MAX_BACKFILL_DELAY_S)
    raise self.retry(exc=reason, countdown=delay)


@app.task(
    name="tasks.events.apply_inbox",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=10,
)
def apply_inbox(self: Task) -> int:
    """Apply accepted transactions in order until none wait; returns how many."""
    resources = get_resources()
    inbox_consumer_started()
    deadline = time.monotonic() + INBOX_RUN_BUDGET_S
    applied = 0
    try:
        while True:
            run = apply_accepted(resources.engine, resources.settings, publish_outcome)
            applied += run.transactions
            if not run.more:
                return applied
            if time.monotonic() > deadline:
                wake_inbox_consumer(force=True)
                return applied
    except (OperationalError, IntegrityError) as exc:
        # The database is away, or a clash with a concurrent writer: the batch rolled
        # back whole and waits in the inbox; so does everything behind it, in order.
        delay = min(2**self.request.retries, MAX_INBOX_RETRY_DELAY_S)
        raise self.retry(exc=exc, countdown=delay) from exc
