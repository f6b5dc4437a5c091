"""Scheduled tasks (see beat.py): reconcile the queue, refresh profiles, prune."""

from __future__ import annotations

import logging

from directory import maintenance
from directory.clock import now_ms
from tasks.app import app
from tasks.outbox import publish_due_fetches, publish_fetches
from tasks.resources import get_resources

logger = logging.getLogger(__name__)


@app.task(name="tasks.maintenance.reconcile")
def reconcile() -> int:
    """Republish every due fetch: repairs lost publishes, expired leases, ended backoffs."""
    return publish_due_fetches()


@app.task(name="tasks.maintenance.refresh_profiles")
def refresh_profiles() -> int:
    resources = get_resources()
    with resources.engine.begin() as conn:
        servers = maintenance.queue_refreshes(conn, resources.settings, now_ms())
    publish_fetches(servers)
    return len(servers)


@app.task(name="tasks.maintenance.prune_entries")
def prune_entries() -> int:
    resources = get_resources()
    with resources.engine.begin() as conn:
        pruned = maintenance.prune_orphans(conn)
    if pruned:
        logger.warning("pruned %d entries of users in no visible room", pruned)
    return pruned
