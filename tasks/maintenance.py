"""Scheduled tasks (see beat.py): reconcile the queue, refresh profiles, prune."""

from __future__ import annotations

import logging

from directory import maintenance
from directory.clock import now_ms
from directory.snapshots import RECONCILE
from directory.storage import inbox, transactions
from tasks.app import app
from tasks.outbox import publish_backfills, publish_due_work, publish_fetches
from tasks.resources import get_resources

logger = logging.getLogger(__name__)


@app.task(name="tasks.maintenance.reconcile")
def reconcile() -> int:
    """Republish every due fetch: repairs lost publishes, expired leases, ended backoffs."""
    return publish_due_work()


@app.task(name="tasks.maintenance.refresh_profiles")
def refresh_profiles() -> int:
    resources = get_resources()
    with resources.engine.begin() as conn:
        servers = maintenance.queue_refreshes(conn, resources.settings, now_ms())
    publish_fetches(servers)
    return len(servers)


@app.task(name="tasks.maintenance.prune_entries")
def prune_entries() -> int:
    """Remove orphaned entries, and transaction ids too old to be replayed."""
    resources = get_resources()
    retention_ms = int(resources.settings.transaction_retention_seconds * 1000)
    with resources.engine.begin() as conn:
        # Entries follow memberships, which only the inbox consumer writes: the prune
        # waits for it, so it never judges a user by half-applied memberships.
        inbox.lock_consumer(conn)
        pruned = maintenance.prune_orphans(conn)
        transactions.forget_before(conn, now_ms() - retention_ms)
    if pruned:
        logger.warning("pruned %d entries of users in no visible room", pruned)
    return pruned


@app.task(name="tasks.maintenance.recheck_rooms")
def recheck_rooms() -> int:
    """Read again the visible rooms whose check is due (a bounded slice, oldest first):
    what events failed to tell us is repaired through the same hooks."""
    resources = get_resources()
    with resources.engine.begin() as conn:
        rooms = maintenance.take_rooms_to_recheck(conn, resources.settings, now_ms())
    return publish_backfills(rooms, purpose=RECONCILE)
