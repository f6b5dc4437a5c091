"""Events in: accepted durably at once, applied in order by one consumer at a time.

The inbox holds two kinds of items: transactions from the homeserver, and room
snapshots (directory/snapshots.py) read by the backfill, the bootstrap and the
reconciliation. The consumer is the only writer of memberships, so a snapshot and a
batch of events are never applied at the same time, and each is applied in order
with the items around it.

Accepting an appservice transaction is one INSERT into the inbox, in the same database
transaction as its txn id: the homeserver gets its 200 as soon as the events are
durable, whatever the directory work costs. The consumer then applies the oldest
transactions together, up to INGEST_BATCH_EVENTS events in one database transaction
(directory.membership.process_events is set-based, so 5,000 events cost about as many
statements as 100), deletes them from the inbox in that same transaction and hands the
outcome to the publisher after commit. A crash leaves either the rows or their
effects, never half of both; and applying events twice changes nothing.

Callers wake the consumer after accepting and supply the publish callable, so this
module needs no Celery.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError

from directory import jsoncodec
from directory.clock import now_ms
from directory.config import Settings
from directory.listing import rules_for
from directory.membership import BatchOutcome, process_events
from directory.snapshots import SnapshotItem, apply_snapshots
from directory.storage import bootstrap as bootstrap_store
from directory.storage import counters, inbox, transactions
from directory.storage.common import is_postgresql
from directory.telemetry import apply_delays

logger = logging.getLogger(__name__)

Publisher = Callable[[BatchOutcome], None]
Wake = Callable[[], None]


@dataclass
class Applied:
    transactions: int
    outcome: BatchOutcome
    # Accepted transactions are still waiting: call again.
    more: bool
    # Another consumer was applying (only when not waiting for it): nothing was done.
    busy: bool = False


def accept_transaction(engine: Engine, events: Sequence[object], txn_id: str | None = None) -> bool:
    """Durable when this returns; the caller then wakes the consumer. False for a
    txn_id accepted before (a replay), which is not stored again."""
    payload = jsoncodec.pack(events)
    now = now_ms()
    if txn_id is not None and is_postgresql(engine):
        # One statement in autocommit: one round trip, committed (and flushed, as
        # synchronous_commit is on) when it returns; no BEGIN or COMMIT to wait for.
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            return inbox.append_unless_seen(conn, txn_id, payload, len(events), now)
    with engine.begin() as conn:
        if txn_id is not None and not transactions.record(conn, txn_id, now, len(events)):
            return False
        inbox.append(conn, payload, len(events), now)
    return True


def apply_accepted(
    engine: Engine, settings: Settings, publish: Publisher, *, wait: bool = True
) -> Applied:
    """Apply the oldest accepted transactions, up to settings.ingest_batch_events.
    `wait`: for another consumer to finish; without it, a busy consumer returns at once.

    If the database is away (OperationalError: also deadlocks and serialization
    failures) the batch rolls back and waits in the inbox for the caller to try again.
    Any other failure may come from the events themselves: the batch is applied again
    event by event, and the events that fail alone are logged and skipped, so one
    event we cannot apply never holds every later transaction in the inbox."""
    try:
        applied = _apply(engine, settings, isolate_failures=False, wait=wait)
    except OperationalError:
        raise
    except Exception:
        logger.exception("applying a batch failed; applying its events one at a time")
        applied = _apply(engine, settings, isolate_failures=True, wait=wait)
    if applied.transactions:
        publish(applied.outcome)
    return applied


def accept_snapshots(conn: Connection, items: Sequence[SnapshotItem]) -> None:
    """Queue room snapshots behind everything accepted so far, in the caller's
    transaction (which may record what else the read settled); the caller wakes the
    consumer after commit."""
    now = now_ms()
    for item in items:
        inbox.append(conn, jsoncodec.pack(item.to_payload()), item.size, now, kind=inbox.SNAPSHOT)


def _apply(engine: Engine, settings: Settings, *, isolate_failures: bool, wait: bool) -> Applied:
    with engine.begin() as conn:
        if wait:
            inbox.lock_consumer(conn)
        elif not inbox.try_lock_consumer(conn):
            return Applied(0, BatchOutcome(), False, busy=True)
        taken = inbox.take(conn, settings.ingest_batch_events)
        if not taken.items:
            return Applied(0, BatchOutcome(), False)
        now = now_ms()
        outcome = BatchOutcome()
        for kind, items in _runs_of_one_kind(taken.items):
            if kind == inbox.EVENTS:
                events = [event for item in items for event in _events_of(item)]
                process = partial(
                    process_events,
                    conn,
                    server_name=settings.server_name,
                    now_ms=now,
                    profile_max_age_seconds=settings.profile_max_age_seconds,
                    listing=rules_for(settings),
                )
                if isolate_failures:
                    outcome.merge(_process_one_by_one(conn, events, process))
                else:
                    outcome.merge(process(events))
            elif kind == inbox.SNAPSHOT:
                snapshots = [s for s in map(_snapshot_of, items) if s is not None]
                apply = partial(
                    apply_snapshots,
                    conn,
                    server_name=settings.server_name,
                    now_ms=now,
                    profile_max_age_seconds=settings.profile_max_age_seconds,
                    recheck_seconds=settings.room_recheck_seconds,
                    listing=rules_for(settings),
                )
                if isolate_failures:
                    outcome.merge(_apply_snapshots_one_by_one(conn, snapshots, apply, now))
                else:
                    outcome.merge(apply(snapshots))
            else:
                # Only a newer version of this service writes other kinds.
                logger.error("%d inbox rows of unknown kind %r dropped", len(items), kind)
        inbox.remove(conn, [item.id for item in taken.items])
        # How long each item waited in the inbox, for /metrics: applied when this commits.
        delays = apply_delays(((item.kind, item.received_at_ms) for item in taken.items), now_ms())
        counters.add(conn, delays)
    return Applied(len(taken.items), outcome, taken.more)


def _runs_of_one_kind(
    items: Sequence[inbox.InboxItem],
) -> list[tuple[str, list[inbox.InboxItem]]]:
    """Consecutive items of one kind, in inbox order: each run is applied set-based."""
    runs: list[tuple[str, list[inbox.InboxItem]]] = []
    for item in items:
        if runs and runs[-1][0] == item.kind:
            runs[-1][1].append(item)
        else:
            runs.append((item.kind, [item]))
    return runs


def _process_one_by_one(
    conn: Connection, events: list[object], process: Callable[[list[object]], BatchOutcome]
) -> BatchOutcome:
    # Each event in its own savepoint, in order: the same end state as the batch, as the
    # hooks are order-preserving and replayable; only slower (this runs after a failure).
    outcome = BatchOutcome()
    for index, event in enumerate(events):
        try:
            with conn.begin_nested():
                outcome.merge(process([event]))
        except OperationalError:
            raise
        except Exception:
            outcome.events += 1
            outcome.invalid += 1
            logger.exception(
                "skipping event #%d of the batch, it cannot be applied: %.2000r", index, event
            )
    return outcome


def _apply_snapshots_one_by_one(
    conn: Connection,
    snapshots: list[SnapshotItem],
    apply: Callable[[list[SnapshotItem]], BatchOutcome],
    now: int,
) -> BatchOutcome:
    outcome = BatchOutcome()
    for item in snapshots:
        try:
            with conn.begin_nested():
                outcome.merge(apply([item]))
        except OperationalError:
            raise
        except Exception as exc:
            logger.exception("skipping the snapshot of %s, it cannot be applied", item.room_id)
            if item.run_id is not None:
                bootstrap_store.room_attempt_failed(
                    conn,
                    item.run_id,
                    item.room_id,
                    item.attempt + 1,
                    None,
                    f"could not be applied: {type(exc).__name__}: {exc}",
                    now,
                )
                bootstrap_store.finish_if_done(conn, item.run_id, now)
    return outcome


def ingest_events(
    engine: Engine, settings: Settings, events: Sequence[object], publish: Publisher
) -> BatchOutcome:
    """Accept a batch and apply everything accepted so far, in this thread (tools and
    tests; the HTTP server leaves the applying to the workers)."""
    accept_transaction(engine, events)
    total = BatchOutcome()
    while True:
        applied = apply_accepted(engine, settings, publish)
        total.merge(applied.outcome)
        if not applied.more:
            return total


def _snapshot_of(item: inbox.InboxItem) -> SnapshotItem | None:
    try:
        return SnapshotItem.from_payload(jsoncodec.unpack(item.payload))
    except (ValueError, zlib.error, KeyError, TypeError, AttributeError):
        logger.error("inbox row %d is not a room snapshot; dropped", item.id)
        return None


def _events_of(item: inbox.InboxItem) -> list[object]:
    # Only this module writes payloads, always a JSON array; anything else is dropped
    # loudly rather than blocking every transaction behind it.
    try:
        events = jsoncodec.unpack(item.payload)
    except (ValueError, zlib.error):
        events = None
    if not isinstance(events, list):
        logger.error("inbox row %d is not a JSON array of events; dropped", item.id)
        return []
    return events
