"""Event batches in, published through the Celery outbox (tests and tools use this)."""

from __future__ import annotations

from collections.abc import Sequence

from directory import ingest
from directory.membership import BatchOutcome
from tasks.outbox import publish_outcome
from tasks.resources import get_resources


def ingest_events(events: Sequence[object]) -> BatchOutcome:
    resources = get_resources()
    outcome = ingest.ingest_events(resources.engine, resources.settings, events, publish_outcome)
    assert outcome is not None  # no txn_id: never a replay
    return outcome
