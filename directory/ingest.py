"""Events in: accepted durably at once, applied in order by one consumer at a time.

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
from directory.membership import BatchOutcome, process_events
from directory.storage import inbox, transactions
from directory.storage.common import is_postgresql

logger = logging.getLogger(__name__)

Publisher = Callable[[BatchOutcome], None]
Wake = Callable[[], None]


@dataclass
class Applied:
    transactions: int
    outcome: BatchOutcome
    # Accepted transactions are still waiting: call again.
    more: bool


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


def apply_accepted(engine: Engine, settings: Settings, publish: Publisher) -> Applied:
    """Apply the oldest accepted transactions, up to settings.ingest_batch_events.

    If the database is away (OperationalError: also deadlocks and serialization
    failures) the batch rolls back and waits in the inbox for the caller to try again.
    Any other failure may come from the events themselves: the batch is applied again
    event by event, and the events that fail alone are logged and skipped, so one
    event we cannot apply never holds every later transaction in the inbox."""
    try:
        applied = _apply(engine, settings, isolate_failures=False)
    except OperationalError:
        raise
    except Exception:
        logger.exception("applying a batch failed; applying its events one at a time")
        applied = _apply(engine, settings, isolate_failures=True)
    if applied.transactions:
        publish(applied.outcome)
    return applied


def _apply(engine: Engine, settings: Settings, *, isolate_failures: bool) -> Applied:
    with engine.begin() as conn:
        inbox.lock_consumer(conn)
        taken = inbox.take(conn, settings.ingest_batch_events)
        if not taken.items:
            return Applied(0, BatchOutcome(), False)
        events = [event for item in taken.items for event in _events_of(item)]
        process = partial(
            process_events,
            conn,
            server_name=settings.server_name,
            now_ms=now_ms(),
            profile_max_age_seconds=settings.profile_max_age_seconds,
        )
        if isolate_failures:
            outcome = _process_one_by_one(conn, events, process)
        else:
            outcome = process(events)
        inbox.remove(conn, [item.id for item in taken.items])
    return Applied(len(taken.items), outcome, taken.more)


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
