"""Follow-up fetch runs (tasks.outbox._schedule_fetch): runs that stop together queue one
delayed run per destination, but a retry due EARLIER than the one already queued gets
its own run, so it is not left waiting behind a later one (a destination's backoff
ending in minutes must not delay a user's retry due in seconds)."""

from __future__ import annotations

from redis import Redis
from sqlalchemy import Engine

from tasks.app import FETCH_QUEUE
from tasks.outbox import _schedule_fetch


def queued(redis_client: Redis) -> int:
    return int(redis_client.llen(FETCH_QUEUE))


def test_one_follow_up_per_destination_unless_an_earlier_one_is_needed(
    db: Engine, redis_client: Redis
) -> None:
    assert _schedule_fetch("a.test", 300) == 1
    # Later than, or as late as, the one queued: nothing more.
    assert _schedule_fetch("a.test", 400) == 0
    assert _schedule_fetch("a.test", 300) == 0
    # Earlier: a run of its own, and it becomes the mark the next ones compare with.
    assert _schedule_fetch("a.test", 5) == 1
    assert _schedule_fetch("a.test", 200) == 0
    # Each destination has its own.
    assert _schedule_fetch("b.test", 300) == 1
    assert queued(redis_client) == 3


def test_the_mark_ends_before_its_run_starts(db: Engine, redis_client: Redis) -> None:
    # A run due now (a retry already due) leaves no mark for the run it starts to trip on.
    assert _schedule_fetch("a.test", 0) == 1
    assert _schedule_fetch("a.test", 0) == 1
    assert queued(redis_client) == 2
