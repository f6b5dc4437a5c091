"""Fetch tasks: a thin wrapper around directory.fetching."""

from __future__ import annotations

import logging

import redis
from celery import Task
from sqlalchemy.exc import DBAPIError

from directory.fetching import DestinationRun
from tasks.app import app
from tasks.outbox import destination_drained, publish_fetches
from tasks.resources import get_resources

logger = logging.getLogger(__name__)


# A run that failed because Redis or the database went away is tried again soon:
# 1 s doubling to 10 s, a handful of times (then reconciliation takes over).
MAX_RUN_RETRIES = 8
MAX_RUN_RETRY_DELAY_S = 10


@app.task(
    name="tasks.fetch.fetch_destination",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=MAX_RUN_RETRIES,
)
def fetch_destination(self: Task, server_name: str) -> None:
    resources = get_resources()
    run = DestinationRun(
        resources.engine,
        resources.redis,
        resources.profiles,
        resources.settings,
        # Back from a backoff: every slot's run again, not only this probe's.
        on_back=lambda server: publish_fetches([server], force=True),
    )
    try:
        report = run.run(server_name)
    except (DBAPIError, redis.RedisError) as exc:
        # The run handed back what it held unfetched; its users are due again.
        delay = min(2**self.request.retries, MAX_RUN_RETRY_DELAY_S)
        logger.warning(
            "fetch run for %s failed (%s); again in %d s",
            server_name,
            exc,
            delay,
            extra={"server_name": server_name},
        )
        raise self.retry(exc=exc, countdown=delay) from exc
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
        extra={"server_name": server_name},
    )
    if report.homeserver_error:
        logger.warning(
            "our homeserver did not serve a profile request (%s); the users of %s wait"
            " for it, with no attempt counted",
            report.homeserver_error,
            server_name,
            extra={"server_name": server_name},
        )
    destination_drained(server_name)
