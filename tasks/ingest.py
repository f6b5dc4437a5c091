"""Event batches in, applied at once and published through the Celery outbox (tests and
tools use this; the HTTP server only accepts, and the workers apply)."""

from __future__ import annotations

from collections.abc import Sequence

from directory import ingest
from directory.membership import BatchOutcome
from tasks.outbox import publish_outcome
from tasks.resources import get_resources


def ingest_events(events: Sequence[object]) -> BatchOutcome:
    resources = get_resources()
    return ingest.ingest_events(resources.engine, resources.settings, events, publish_outcome)
