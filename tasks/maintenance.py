"""Scheduled tasks (see beat.py): reconcile the queue, refresh profiles, prune."""

from __future__ import annotations

import logging

from directory import maintenance
from directory.clock import now_ms
from directory.storage import transactions
from tasks.app import app
from tasks.outbox import publish_due_work, publish_fetches
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
        pruned = maintenance.prune_orphans(conn)
        transactions.forget_before(conn, now_ms() - retention_ms)
    if pruned:
        logger.warning("pruned %d entries of users in no visible room", pruned)
    return pruned
