"""Event-side tasks: applying the inbox (events and room snapshots, in order), and
reading a room for a snapshot (backfill when our server joins it, reconciliation)."""

from __future__ import annotations

import logging
import time

from celery import Task
from sqlalchemy.exc import IntegrityError, OperationalError

from directory.backfill import read_room, stop_reading, unreadable
from directory.clock import now_ms
from directory.homeserver import HomeserverError, RateLimited
from directory.ingest import accept_snapshots, apply_accepted
from directory.snapshots import BACKFILL
from tasks.app import app
from tasks.outbox import (
    backfill_started,
    inbox_consumer_busy,
    inbox_consumer_started,
    mark_backfill_queued,
    publish_outcome,
    wake_inbox_consumer,
)
from tasks.resources import get_resources

logger = logging.getLogger(__name__)

# Retries while our homeserver is down or refuses our token: 5 s doubling to 5 min,
# well under the broker's visibility timeout. After the last one the room stays
# marked in the database and reconciliation publishes it again.
MAX_BACKFILL_RETRIES = 8
MAX_BACKFILL_DELAY_S = 300
# A room nobody can read is not asked about again before this (reconciliation then
# tries once more: a local member may have joined meanwhile).
UNREADABLE_RETRY_MS = 3_600_000
# An inbox consumer run hands over to a fresh task after this long, so a long backlog
# never holds one broker message for long; the queue order is kept by the database.
INBOX_RUN_BUDGET_S = 30.0
MAX_INBOX_RETRY_DELAY_S = 30


@app.task(
    name="tasks.events.backfill_room",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=MAX_BACKFILL_RETRIES,
)
def backfill_room(self: Task, room_id: str, purpose: str = BACKFILL, attempt: int = 0) -> int:
    """Read the room and queue its snapshot in the inbox; returns the members read."""
    resources = get_resources()
    backfill_started(room_id)
    try:
        item = read_room(resources.engine, resources.homeserver, room_id, purpose, attempt)
        if item is None:
            return 0  # nobody local to read it as: the room is not visible any more
        if unreadable(item):
            logger.warning("no local member of %s can read it; leaving it as it is", room_id)
            stop_reading(resources.engine, item, now_ms() + UNREADABLE_RETRY_MS)
            return 0
        with resources.engine.begin() as conn:
            accept_snapshots(conn, [item])
    except (HomeserverError, OperationalError, IntegrityError) as exc:
        # Our homeserver (down, refusing our token, rate limiting) or our database:
        # nothing is wrong with the room. Its mark stays; try again later.
        delay = min(5 * 2**self.request.retries, MAX_BACKFILL_DELAY_S)
        if isinstance(exc, RateLimited):
            delay = max(delay, exc.retry_after)
        logger.warning("reading %s failed (%s); again in %.0f s", room_id, exc, delay)
        mark_backfill_queued(room_id, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
    wake_inbox_consumer()
    return item.size


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
            run = apply_accepted(resources.engine, resources.settings, publish_outcome, wait=False)
            if run.busy:
                # Another consumer is applying: rather than hold a thread and a
                # connection waiting for its lock, look again shortly (once, whatever
                # the number of wake-ups meanwhile), in case it has already taken
                # its last batch.
                inbox_consumer_busy()
                return applied
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
