"""Event batches in: one transaction, then publish. The HTTP server calls this."""

from __future__ import annotations

from collections.abc import Sequence

from directory.clock import now_ms
from directory.membership import BatchOutcome, process_events
from tasks.outbox import publish_outcome
from tasks.resources import get_resources


def ingest_events(events: Sequence[object]) -> BatchOutcome:
    """Durable when this returns: the batch is committed before anything is published."""
    resources = get_resources()
    settings = resources.settings
    with resources.engine.begin() as conn:
        outcome = process_events(
            conn,
            events,
            server_name=settings.server_name,
            now_ms=now_ms(),
            profile_max_age_seconds=settings.profile_max_age_seconds,
        )
    publish_outcome(outcome)
    return outcome
