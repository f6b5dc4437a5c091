"""Scheduled tasks (see beat.py): reconcile the queue, refresh profiles, prune."""

from __future__ import annotations

import logging

from directory import listing, maintenance
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


@app.task(name="tasks.maintenance.apply_listing_rules")
def apply_listing_rules() -> int:
    """Judge every entry against the listing rules again (directory/listing.py), a
    batch per transaction, so a changed configuration (sender, other appservices'
    namespaces, EXCLUDE_USER_REGEXES, SHOW_LOCKED_USERS) reaches the entries already
    held. Run when a worker starts and on beat's schedule; only changes are written."""
    resources = get_resources()
    rules = listing.rules_for(resources.settings)
    after: str | None = None
    changed = 0
    while True:
        with resources.engine.begin() as conn:
            after, n = listing.reevaluate(conn, rules, after)
        changed += n
        if after is None:
            break
    if changed:
        logger.info("listing rules: %d entries changed listing", changed)
    return changed
