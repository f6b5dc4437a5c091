"""Fetch tasks: a thin wrapper around directory.fetching."""

from __future__ import annotations

import logging

from directory.fetching import DestinationRun
from tasks.app import app
from tasks.outbox import destination_drained
from tasks.resources import get_resources

logger = logging.getLogger(__name__)


@app.task(name="tasks.fetch.fetch_destination", acks_late=True, reject_on_worker_lost=True)
def fetch_destination(server_name: str) -> None:
    resources = get_resources()
    run = DestinationRun(resources.engine, resources.redis, resources.profiles, resources.settings)
    report = run.run(server_name)
    if not report.acquired_slot:
        # Every slot is taken: the holders drain this destination's due users.
        return
    logger.info(
        "fetched %s: %d applied, %d discarded, %d failed%s",
        server_name,
        report.applied,
        report.discarded,
        report.failed,
        " (backed off)" if report.stopped_by_backoff else "",
    )
    if report.homeserver_error:
        logger.warning(
            "our homeserver did not serve a profile request (%s); the users of %s wait"
            " for it, with no attempt counted",
            report.homeserver_error,
            server_name,
        )
    destination_drained(server_name)
