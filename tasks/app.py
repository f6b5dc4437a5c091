"""The Celery application and the settings chosen for durability (see README).

- Late acks and reject-on-worker-lost: a task whose worker dies is delivered again.
  Every task here is idempotent, so running twice is safe; losing one is not.
- Prefetch 1: a worker holds no more tasks than it runs, so a busy or dead worker does
  not sit on fetches another could do.
- Visibility timeout far above any task's run time and any countdown we use: Redis
  redelivers an unacknowledged task only after it.
- Task events on, for Flower (worker-side only: a "sent" event per publish would double
  the cost of publishing, which the event consumer does in bulk).
- Three queues, so operators can scale event processing, fetching and maintenance apart.
"""

from __future__ import annotations

import logging

from celery import Celery, current_task, signals
from kombu import Exchange, Queue

from directory.config import get_settings
from directory.logs import add_context, configure_logging, is_configured

logger = logging.getLogger(__name__)

EVENTS_QUEUE = "events"
FETCH_QUEUE = "fetch"
MAINTENANCE_QUEUE = "maintenance"
ALL_QUEUES = (EVENTS_QUEUE, FETCH_QUEUE, MAINTENANCE_QUEUE)

# Redis redelivers unacknowledged tasks after this. Fetch runs stop claiming after
# FETCH_TASK_BUDGET_SECONDS (default 60) and we never use long countdowns: the long
# backoffs live in the database, not in the broker.
VISIBILITY_TIMEOUT_SECONDS = 3600

settings = get_settings()

app = Celery(
    "directory",
    broker=settings.redis_url,
    include=["tasks.events", "tasks.fetch", "tasks.maintenance", "tasks.bootstrap"],
)
app.conf.update(
    task_queues=[Queue(name, Exchange(name), routing_key=name) for name in ALL_QUEUES],
    task_default_queue=MAINTENANCE_QUEUE,
    task_routes={
        "tasks.fetch.*": {"queue": FETCH_QUEUE},
        "tasks.maintenance.*": {"queue": MAINTENANCE_QUEUE},
        "tasks.events.*": {"queue": EVENTS_QUEUE},
        "tasks.bootstrap.*": {"queue": EVENTS_QUEUE},
    },
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
    broker_connection_retry_on_startup=True,
    # A publish while Redis is down fails fast instead of stalling the caller; the
    # pending table still holds the work and reconciliation republishes it.
    task_publish_retry_policy={
        "max_retries": 2,
        "interval_start": 0.1,
        "interval_step": 0.2,
        "interval_max": 0.5,
    },
    worker_hijack_root_logger=False,
    timezone="UTC",
)


@signals.setup_logging.connect
def logging_is_ours(**_kwargs: object) -> None:
    """worker.py and beat.py configured logging (directory/logs.py, LOG_FORMAT): Celery
    adds no handler and no formatter of its own, and leaves stdout alone. A Celery
    program started otherwise (`celery -A tasks.app worker`) gets the same setup here."""
    if not is_configured():
        configure_logging(settings, "celery")


# The field a task's first argument fills in its log lines.
TASK_SUBJECTS = {
    "tasks.events.backfill_room": "room_id",
    "tasks.fetch.fetch_destination": "server_name",
}


def task_log_fields(record: logging.LogRecord) -> dict[str, object]:
    """The task a log line belongs to, for JSON logs: the one running in this thread
    (with the room or server it is about), or the one Celery's own "received" and
    "succeeded" lines are about."""
    task = current_task
    if task:
        fields: dict[str, object] = {"task_id": task.request.id, "task": task.name}
        subject = TASK_SUBJECTS.get(task.name)
        if subject is not None:
            args, kwargs = task.request.args or (), task.request.kwargs or {}
            fields[subject] = kwargs.get(subject, args[0] if args else None)
        return fields
    data = record.__dict__.get("data")
    if isinstance(data, dict) and data.get("id"):
        return {"task_id": data["id"], "task": data.get("name")}
    return {}


add_context(task_log_fields)


@signals.celeryd_after_setup.connect
def banner_as_one_log_line(sender: str, instance: object, **_kwargs: object) -> None:
    """With JSON logs the worker's banner (printed, many lines) is one log line too."""
    if settings.log_format == "json":
        instance.quiet = True  # type: ignore[attr-defined]
        info = instance.startup_info(artlines=False)  # type: ignore[attr-defined]
        logger.info("celery worker %s starting\n%s", sender, info.strip("\n"))


@signals.worker_process_init.connect
def open_connections_in_child(**_kwargs: object) -> None:
    """A prefork child connects before its first task, not during it: a fresh pool of
    children otherwise spends its first seconds connecting instead of fetching."""
    from tasks.resources import get_resources

    try:
        resources = get_resources()
        with resources.engine.connect():
            pass
        resources.redis.ping()
    except Exception:
        logger.warning("worker child: could not connect yet; the first task will retry")


@signals.worker_ready.connect
def rebuild_queue_on_start(**_kwargs: object) -> None:
    """Whatever the broker lost (a restart, a flush), the pending table still has."""
    from tasks.bootstrap import start_on_empty_database
    from tasks.maintenance import publish_due_work

    try:
        published = publish_due_work(force=True)
        logger.info("worker start: queued %d tasks of due work", published)
    except Exception:
        logger.exception("worker start: could not rebuild the queue; beat will retry")
    try:
        start_on_empty_database()
    except Exception:
        logger.exception("worker start: could not check whether a bootstrap is needed")
    try:
        # A changed configuration of who is listed reaches the entries already held.
        from tasks.maintenance import apply_listing_rules

        apply_listing_rules.delay()
    except Exception:
        logger.exception("worker start: could not queue the listing rules; beat will")
