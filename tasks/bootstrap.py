"""Bootstrap tasks: listing a run's rooms, and reading them (directory/bootstrap.py).

One lister per run (a Redis lock), and loaders sharing BOOTSTRAP_CONCURRENCY slots (a
Redis semaphore), so at most that many room reads are in flight to our homeserver
whatever the number of workers. Both stop after a time budget and queue their
successor, and the database holds their progress: a killed worker loses a lease at
most.
"""

from __future__ import annotations

import logging
import time

from directory import bootstrap
from directory.clock import now_ms
from directory.locks import Lock, Semaphore
from directory.storage import bootstrap as bootstrap_store
from directory.storage import rooms as room_store
from tasks.app import EVENTS_QUEUE, app
from tasks.outbox import (
    BOOTSTRAP_LIST_TASK,
    BOOTSTRAP_LOAD_TASK,
    FOLLOW_UP_HORIZON_MS,
    bootstrap_lister_key,
    bootstrap_loaders_drained,
    bootstrap_waiter_key,
    publish_bootstrap,
    wake_inbox_consumer,
)
from tasks.resources import get_resources

logger = logging.getLogger(__name__)

SLOTS_KEY = "ud:bootstrap:slots"


# A step's time budget; the next step is a new task, so no broker message is held long.
STEP_BUDGET_S = 30.0
# Locks and slots are extended between rooms and pages, so only a dead holder loses
# them, and a dead holder's come back within this (a read of one huge room's state
# may outlast it, and a loader more may then read for a moment).
HOLD_TTL_MS = 30_000
EXTEND_EVERY_S = 5.0
WAITER_MARGIN_MS = 5_000


class _Keeper:
    """Extends a lock or slot now and then, not on every call."""

    def __init__(self, extend) -> None:
        self.extend = extend
        self.next_at = time.monotonic() + EXTEND_EVERY_S

    def __call__(self) -> None:
        if time.monotonic() >= self.next_at:
            self.extend()
            self.next_at = time.monotonic() + EXTEND_EVERY_S


@app.task(name=BOOTSTRAP_LIST_TASK, acks_late=True, reject_on_worker_lost=True)
def list_rooms(run_id: int) -> int:
    """List rooms of the run for one step; returns how many were listed."""
    resources = get_resources()
    lock = Lock(resources.redis, bootstrap_lister_key(run_id), HOLD_TTL_MS)
    if not lock.acquire():
        # Another lister is at it, or died holding the lock: look again once it would
        # have expired, while the listing is not complete.
        with resources.engine.connect() as conn:
            run = bootstrap_store.get_run(conn, run_id)
        if run is not None and run.listed_at_ms is None and run.finished_at_ms is None:
            app.send_task(
                BOOTSTRAP_LIST_TASK,
                args=(run_id,),
                queue=EVENTS_QUEUE,
                countdown=HOLD_TTL_MS / 1000,
            )
        return 0
    try:
        result = bootstrap.list_step(
            resources.engine,
            resources.homeserver,
            resources.settings,
            run_id,
            STEP_BUDGET_S,
            keep_alive=_Keeper(lock.extend),
        )
    finally:
        lock.release()
    if result.done:
        logger.info("bootstrap run %d: listed %d rooms", run_id, result.done)
    publish_bootstrap(run_id, lister=False)
    if result.retry_in is not None:
        app.send_task(
            BOOTSTRAP_LIST_TASK, args=(run_id,), queue=EVENTS_QUEUE, countdown=result.retry_in
        )
    elif not result.finished:
        app.send_task(BOOTSTRAP_LIST_TASK, args=(run_id,), queue=EVENTS_QUEUE)
    return result.done


@app.task(name=BOOTSTRAP_LOAD_TASK, acks_late=True, reject_on_worker_lost=True)
def load_rooms(run_id: int, waiter: bool = False) -> int:
    """Read due rooms of the run for one step; returns how many were read. `waiter`:
    this run was queued to look again at slots held by others (see below)."""
    resources = get_resources()
    waiter_key = bootstrap_waiter_key(run_id)
    if waiter:
        # Whatever happens next, the next loader to find the slots taken may wait.
        resources.redis.delete(waiter_key)
    slot = Semaphore(
        resources.redis, SLOTS_KEY, resources.settings.bootstrap_concurrency, HOLD_TTL_MS
    )
    if not slot.acquire():
        # BOOTSTRAP_CONCURRENCY loaders are reading already, or died holding their
        # slots (a killed worker's expire within HOLD_TTL_MS): one waiter looks again
        # a while later, so the run never stalls behind dead loaders.
        # The mark outlives the waiter's countdown only a little: a waiter lost with
        # its worker blocks others no longer than that (a forced publish, as a
        # starting worker or the CLI makes, clears it at once).
        if resources.redis.set(waiter_key, 1, nx=True, px=HOLD_TTL_MS // 2 + WAITER_MARGIN_MS):
            app.send_task(
                BOOTSTRAP_LOAD_TASK,
                args=(run_id, True),
                queue=EVENTS_QUEUE,
                countdown=HOLD_TTL_MS / 2000,
            )
        return 0
    try:
        result = bootstrap.load_step(
            resources.engine,
            resources.homeserver,
            run_id,
            STEP_BUDGET_S,
            wake=wake_inbox_consumer,
            keep_alive=_Keeper(slot.extend),
        )
    finally:
        slot.release()
    if result.retry_in is not None:
        app.send_task(
            BOOTSTRAP_LOAD_TASK, args=(run_id,), queue=EVENTS_QUEUE, countdown=result.retry_in
        )
    elif not result.finished:
        app.send_task(BOOTSTRAP_LOAD_TASK, args=(run_id,), queue=EVENTS_QUEUE)
    else:
        _drained(run_id)
    return result.done


def _drained(run_id: int) -> None:
    """Nothing to read now: rooms the listing adds, or whose retry comes due, need a
    loader again (the lister wakes them; a retry soon gets one scheduled here; later
    ones wait for beat)."""
    bootstrap_loaders_drained(run_id)
    resources = get_resources()
    now = now_ms()
    with resources.engine.connect() as conn:
        next_due = bootstrap_store.next_due_ms(conn, run_id)
    if next_due is not None and next_due - now <= FOLLOW_UP_HORIZON_MS:
        app.send_task(
            BOOTSTRAP_LOAD_TASK,
            args=(run_id,),
            queue=EVENTS_QUEUE,
            countdown=max(0.0, (next_due - now) / 1000),
        )


def start_on_empty_database() -> None:
    """At worker start: a directory that knows no room on a homeserver that may have
    many needs a bootstrap. Run it (BOOTSTRAP_ON_START) or say how."""
    resources = get_resources()
    settings = resources.settings
    with resources.engine.connect() as conn:
        if room_store.count_visible(conn) or bootstrap_store.latest_run(conn) is not None:
            return
    if not settings.bootstrap_on_start:
        logger.warning(
            "the directory knows no room yet: if the homeserver already has rooms, load them"
            " with `make bootstrap` (python -m directory bootstrap, with ADMIN_TOKEN set or"
            " --users-file), or set BOOTSTRAP_ON_START=true"
        )
        return
    try:
        source = bootstrap.source_for(settings, users_file=False)
        bootstrap.check_homeserver(resources.homeserver, source)
        run_id, _ = bootstrap.start(resources.engine, source)
    except bootstrap.BootstrapError as exc:
        logger.error("BOOTSTRAP_ON_START: cannot bootstrap: %s", exc)
        return
    logger.info("BOOTSTRAP_ON_START: bootstrap run %d started", run_id)
    publish_bootstrap(run_id, lister=True)
