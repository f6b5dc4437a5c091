"""A batch of events in: one transaction, then the publish callback (after commit).

Used by the HTTP server for appservice transactions and by anything else that feeds
events; the caller supplies the publisher, so this module needs no Celery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import Engine

from directory.clock import now_ms
from directory.config import Settings
from directory.membership import BatchOutcome, process_events
from directory.storage import transactions

Publisher = Callable[[BatchOutcome], None]


def ingest_events(
    engine: Engine,
    settings: Settings,
    events: Sequence[object],
    publish: Publisher,
    txn_id: str | None = None,
) -> BatchOutcome | None:
    """Durable when this returns. With a txn_id, a transaction seen before is not
    processed again and None is returned."""
    with engine.begin() as conn:
        if txn_id is not None and not transactions.record(conn, txn_id, now_ms(), len(events)):
            return None
        outcome = process_events(
            conn,
            events,
            server_name=settings.server_name,
            now_ms=now_ms(),
            profile_max_age_seconds=settings.profile_max_age_seconds,
        )
    publish(outcome)
    return outcome
