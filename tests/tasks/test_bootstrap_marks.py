"""Redis marks of a bootstrap run that a dead worker leaves behind: a forced publish (a
starting worker, the CLI run again) clears the waiter's mark, so the loaders it queues,
finding the dead loaders' slots still taken, queue a waiter of their own instead of
trusting one that died (the run stalled: tests/tasks/test_bootstrap.py's resume test,
under load)."""

from __future__ import annotations

from redis import Redis
from sqlalchemy import Engine

from tasks.app import EVENTS_QUEUE
from tasks.outbox import bootstrap_waiter_key, publish_bootstrap


def test_a_forced_publish_clears_a_dead_waiters_mark(db: Engine, redis_client: Redis) -> None:
    redis_client.set(bootstrap_waiter_key(7), 1, px=60_000)
    publish_bootstrap(7, lister=False)
    assert redis_client.exists(bootstrap_waiter_key(7))
    sent = publish_bootstrap(7, lister=False, force=True)
    assert sent >= 1 and redis_client.llen(EVENTS_QUEUE) >= sent
    assert not redis_client.exists(bootstrap_waiter_key(7))
