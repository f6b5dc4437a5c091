"""The one place that publishes fetch work, always after the rows it announces commit.

Publishing is only the fast path: if it fails (Redis down) or is lost (a flush, a
crash), the pending rows are still in the database and reconciliation republishes
them. A short-lived Redis key per destination keeps a burst of batches touching the
same server from publishing a task for each batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from directory.clock import now_ms
from directory.membership import BatchOutcome
from directory.snapshots import BACKFILL, reread_delay_ms
from directory.storage import bootstrap as bootstrap_store
from directory.storage import inbox, pending
from directory.storage import rooms as room_store
from tasks.app import EVENTS_QUEUE, FETCH_QUEUE, app
from tasks.resources import get_resources

logger = logging.getLogger(__name__)

FETCH_TASK = "tasks.fetch.fetch_destination"
BACKFILL_TASK = "tasks.events.backfill_room"
INBOX_TASK = "tasks.events.apply_inbox"
BOOTSTRAP_LIST_TASK = "tasks.bootstrap.list_rooms"
BOOTSTRAP_LOAD_TASK = "tasks.bootstrap.load_rooms"
# Set while an inbox consumer task is queued and not started: accepted transactions
# need one consumer run after them, not one each.
INBOX_WAKE_KEY = "ud:inbox:wake"
# Set while a consumer run is queued to look again after finding another applying.
INBOX_RETRY_KEY = "ud:inbox:retry"
INBOX_RETRY_DELAY_MS = 500
# How long a "tasks already queued for this destination" mark lives without a run
# clearing it: after this, reconciliation may publish again (the runs were lost).
QUEUED_MARK_TTL_MS = 30_000
# A retry due within this long (a user's retry, a destination's backoff, a lease
# ending) gets a delayed task, one per destination; later ones wait for
# reconciliation. Far below the broker's visibility timeout (tasks/app.py).
FOLLOW_UP_HORIZON_MS = 600_000
FOLLOW_UP_MARK_MARGIN_MS = 1_000
# Rooms whose backfill is republished per reconciliation run.
BACKFILLS_PER_RUN = 500
# A room read queued and not started yet: reconciliation does not publish it again.
# The task clears it when it starts; the expiry only covers a task the broker lost.
BACKFILL_MARK_TTL_MS = 600_000
# Set while loader tasks of a bootstrap run are queued or running (cleared by a loader
# that finds nothing to do); the lister's lock, while a lister runs.
BOOTSTRAP_LOADERS_MARK_TTL_MS = 30_000


def queued_key(server_name: str) -> str:
    return f"ud:dest:{server_name}:queued"


def backfill_queued_key(room_id: str) -> str:
    return f"ud:backfill:{room_id}:queued"


def bootstrap_loaders_key(run_id: int) -> str:
    return f"ud:bootstrap:{run_id}:loaders"


def bootstrap_lister_key(run_id: int) -> str:
    return f"ud:bootstrap:{run_id}:lister"


def bootstrap_waiter_key(run_id: int) -> str:
    """Set while a loader is queued to look again at slots others hold (tasks/bootstrap.py)."""
    return f"ud:bootstrap:{run_id}:waiter"


def publish_outcome(outcome: BatchOutcome) -> None:
    """Everything a committed batch asks for: fetches, reads of joined rooms (at once,
    whatever is queued: a read from before the join is stale), rooms to read again,
    and bootstrap loaders with rooms to read again or a run to close."""
    # The batch's own counts size the runs: a few new users on a server need one run,
    # not one per slot (a later batch finding the mark set adds none; the run claims
    # whatever is due until none is, and its end republishes with the true count).
    publish_fetches(outcome.fetch_servers, dict(outcome.fetch_servers))
    publish_backfills(outcome.rooms_to_backfill, force=True)
    for room_id, purpose, attempt in outcome.snapshots_to_retry:
        publish_backfills(
            [room_id],
            purpose=purpose,
            attempt=attempt,
            countdown=reread_delay_ms(attempt - 1) / 1000,
            force=True,
        )
    for run_id in outcome.bootstrap_runs:
        publish_bootstrap(run_id, lister=False)


def publish_backfills(
    room_ids: Iterable[str],
    *,
    purpose: str = BACKFILL,
    attempt: int = 0,
    countdown: float | None = None,
    force: bool = False,
) -> int:
    """Queue a read of each room, unless one is queued already (`force`: whatever
    Redis says). Returns how many tasks were sent."""
    resources = get_resources()
    rooms = list(room_ids)
    sent = 0
    try:
        # One round trip marks every room: a batch can make thousands of rooms visible.
        ttl = BACKFILL_MARK_TTL_MS + int((countdown or 0) * 1000)
        with resources.redis.pipeline(transaction=False) as pipe:
            for room_id in rooms:
                pipe.set(backfill_queued_key(room_id), 1, nx=not force, px=ttl)
            marked = pipe.execute()
        for room_id, is_new in zip(rooms, marked, strict=True):
            if is_new:
                app.send_task(
                    BACKFILL_TASK,
                    args=(room_id, purpose, attempt),
                    queue=EVENTS_QUEUE,
                    countdown=countdown,
                )
                sent += 1
    except Exception:
        logger.warning(
            "could not publish reads of %d rooms; reconciliation will",
            len(rooms),
            exc_info=True,
        )
    return sent


def mark_backfill_queued(room_id: str, seconds: float) -> None:
    """A read of the room is queued again (a retry in `seconds`)."""
    try:
        get_resources().redis.set(
            backfill_queued_key(room_id), 1, px=BACKFILL_MARK_TTL_MS + int(seconds * 1000)
        )
    except Exception:
        logger.warning("could not mark the read of %s as queued", room_id, exc_info=True)


def backfill_started(room_id: str) -> None:
    """Called before a room is read: a rejoin or refusal from now on queues another
    read, so none is lost behind one that has started."""
    try:
        get_resources().redis.delete(backfill_queued_key(room_id))
    except Exception:
        logger.warning("could not clear the queued mark of %s", room_id, exc_info=True)


def publish_bootstrap(
    run_id: int, *, lister: bool, loaders: bool = True, force: bool = False
) -> int:
    """Queue a bootstrap run's lister and its BOOTSTRAP_CONCURRENCY loaders, unless
    they are queued or running already (`force`: whatever Redis says, as when the
    operator runs the bootstrap again or a worker starts: the tasks Redis thinks are
    queued may have died with a worker). Returns how many tasks were sent."""
    resources = get_resources()
    sent = 0
    try:
        if lister and (force or not resources.redis.exists(bootstrap_lister_key(run_id))):
            app.send_task(BOOTSTRAP_LIST_TASK, args=(run_id,), queue=EVENTS_QUEUE)
            sent += 1
        if force:
            # A waiter queued by a worker that died is gone with it: were its mark
            # left, a loader finding the slots of dead loaders taken would queue none
            # and the run would stall.
            resources.redis.delete(bootstrap_waiter_key(run_id))
        if loaders and resources.redis.set(
            bootstrap_loaders_key(run_id), 1, nx=not force, px=BOOTSTRAP_LOADERS_MARK_TTL_MS
        ):
            for _ in range(resources.settings.bootstrap_concurrency):
                app.send_task(BOOTSTRAP_LOAD_TASK, args=(run_id,), queue=EVENTS_QUEUE)
                sent += 1
    except Exception:
        logger.warning(
            "could not publish the bootstrap's tasks; reconciliation will", exc_info=True
        )
    return sent


def bootstrap_loaders_drained(run_id: int) -> None:
    """A loader found nothing to read now: the next wake-up publishes loaders again."""
    get_resources().redis.delete(bootstrap_loaders_key(run_id))


def publish_fetches(
    servers: Iterable[str], due_counts: dict[str, int] | None = None, *, force: bool = False
) -> int:
    """Queue fetch runs for these destinations, those with the most due users first,
    unless runs are queued already (`force`: whatever Redis says); returns how many
    tasks were sent. The queue is FIFO and the biggest destination takes longest to
    drain: started behind the others, it would hold up convergence."""
    resources = get_resources()
    settings = resources.settings
    servers = list(servers)
    order = due_counts
    if order is None and len(servers) > 1:
        # Only to order: rows committed right after this count must still find every
        # slot's run, so the copies stay what they were without counts.
        order = _due_counts(servers)
    runs: dict[str, int] = {}
    for server in sorted(servers, key=lambda s: -(order or {}).get(s, 0)):
        due = (due_counts or {}).get(server)
        # Enough runs to use the destination's slots, no more than its users need.
        copies = settings.per_destination_concurrency
        if due is not None:
            copies = max(1, min(copies, math.ceil(due / settings.fetch_batch_size)))
        runs[server] = copies
    sent = 0
    try:
        # One round trip marks every destination: a batch touches hundreds, and each
        # round trip in a busy threads pool also waits for the interpreter lock.
        with resources.redis.pipeline(transaction=False) as pipe:
            for server, copies in runs.items():
                pipe.set(queued_key(server), copies, nx=not force, px=QUEUED_MARK_TTL_MS)
            marked = pipe.execute()
        for (server, copies), is_new in zip(runs.items(), marked, strict=True):
            if not is_new:
                continue  # its runs are queued or running already
            for _ in range(copies):
                app.send_task(FETCH_TASK, args=(server,), queue=FETCH_QUEUE)
                sent += 1
    except Exception:
        # Never fail the caller: its rows are committed, beat will publish them (a
        # mark set without its tasks expires after QUEUED_MARK_TTL_MS).
        logger.warning(
            "could not publish fetches for %d destinations; reconciliation will",
            len(runs),
            exc_info=True,
        )
    return sent


def _due_counts(servers: list[str]) -> dict[str, int] | None:
    """Due users per destination; None if the database cannot say (then the order is
    the caller's)."""
    try:
        with get_resources().engine.connect() as conn:
            return dict(pending.due_by_server(conn, now_ms(), servers))
    except Exception:
        logger.warning("could not count due fetches; publishing unordered", exc_info=True)
        return None


def destination_drained(server_name: str) -> None:
    """A run found nothing more to do now: let the next batch publish again, cover rows
    committed while we were finishing, and come back when the next retry is due."""
    resources = get_resources()
    resources.redis.delete(queued_key(server_name))
    now = now_ms()
    with resources.engine.connect() as conn:
        due = pending.has_due(conn, server_name, now)
        next_due = pending.next_due_ms(conn, server_name)
    if due:
        publish_fetches([server_name])
    elif next_due is not None and next_due - now <= FOLLOW_UP_HORIZON_MS:
        # Retries (and the end of a backoff) run on time instead of waiting for the
        # next reconciliation; much later ones are left to beat (no long countdowns in
        # the broker).
        _schedule_fetch(server_name, (next_due - now) / 1000)


def follow_up_key(server_name: str) -> str:
    return f"ud:dest:{server_name}:follow-up"


# Sets the follow-up mark to the new due time (ms) unless a follow-up is marked for no
# later than it already; 1 when the caller should schedule the run.
_MARK_FOLLOW_UP = """
local marked = tonumber(redis.call('get', KEYS[1]))
if marked and marked <= tonumber(ARGV[1]) then
  return 0
end
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
return 1
"""


def _schedule_fetch(server_name: str, in_seconds: float) -> int:
    """One fetch run for the destination in `in_seconds`, unless one is scheduled for
    then or earlier already (several runs stopping together schedule one follow-up; an
    earlier retry still gets its own)."""
    in_seconds = max(0.0, in_seconds)
    try:
        # The mark ends a moment before the run starts, so that run (whose own end may
        # schedule the next follow-up) never finds it still set.
        # (A run within the margin is not marked: at most one per stopping run.)
        ttl_ms = int(in_seconds * 1000) - FOLLOW_UP_MARK_MARGIN_MS
        due_ms = now_ms() + int(in_seconds * 1000)
        redis = get_resources().redis
        if ttl_ms > 0 and not redis.eval(
            _MARK_FOLLOW_UP, 1, follow_up_key(server_name), due_ms, ttl_ms
        ):
            return 0
        app.send_task(FETCH_TASK, args=(server_name,), queue=FETCH_QUEUE, countdown=in_seconds)
        return 1
    except Exception:
        logger.warning("could not schedule a follow-up for %s", server_name, exc_info=True)
        return 0


def wake_inbox_consumer(*, force: bool = False) -> None:
    """Queue an inbox consumer run unless one is queued and not started yet (`force`:
    whatever Redis says, as reconciliation does). Never fails the caller: the accepted
    rows are committed, and reconciliation wakes the consumer if this is lost."""
    resources = get_resources()
    try:
        marked = resources.redis.set(INBOX_WAKE_KEY, 1, nx=True, px=QUEUED_MARK_TTL_MS)
        if marked or force:
            app.send_task(INBOX_TASK, queue=EVENTS_QUEUE)
    except Exception:
        logger.warning("could not wake the inbox consumer; reconciliation will", exc_info=True)


def inbox_consumer_busy() -> None:
    """A consumer run found another applying: queue one more run a moment later, unless
    one is queued for that already."""
    resources = get_resources()
    try:
        if resources.redis.set(INBOX_RETRY_KEY, 1, nx=True, px=INBOX_RETRY_DELAY_MS):
            app.send_task(INBOX_TASK, queue=EVENTS_QUEUE, countdown=INBOX_RETRY_DELAY_MS / 1000)
    except Exception:
        logger.warning(
            "could not queue the inbox consumer again; reconciliation will", exc_info=True
        )


def inbox_consumer_started() -> None:
    """Called before the consumer reads the inbox: a transaction accepted from now on
    queues another run, so none is left unapplied behind one that has started."""
    get_resources().redis.delete(INBOX_WAKE_KEY)


def publish_due_work(*, force: bool = False) -> int:
    """Queue everything the database says is due: fetch runs for every destination with
    due users, backfills of rooms still waiting for one, an active bootstrap's tasks,
    and the inbox consumer if accepted transactions wait (reconciliation; a starting
    worker forces it, whatever marks Redis holds: the tasks they stand for may have
    died with a worker)."""
    resources = get_resources()
    now = now_ms()
    with resources.engine.connect() as conn:
        due = dict(pending.due_by_server(conn, now))
        # After a worker died, its claims come due when their leases end: a starting
        # worker schedules a run for then rather than leave them to the next
        # reconciliation.
        coming = pending.coming_due_by_server(conn, now, now + FOLLOW_UP_HORIZON_MS)
        rooms = [room for room, _ in room_store.awaiting_backfill(conn, BACKFILLS_PER_RUN)]
        backlog = inbox.backlog(conn)
        run = bootstrap_store.active_run(conn)
        run_due = None if run is None else bootstrap_store.next_due_ms(conn, run.id)
    if backlog.transactions:
        wake_inbox_consumer(force=True)
    sent = publish_fetches(due, due, force=force) + publish_backfills(rooms, force=force)
    if force:
        for server, at in coming:
            sent += _schedule_fetch(server, (at - now) / 1000)
    if run is not None:
        sent += publish_bootstrap(
            run.id,
            lister=run.listed_at_ms is None,
            loaders=run_due is not None and run_due <= now,
            force=force,
        )
    return sent
