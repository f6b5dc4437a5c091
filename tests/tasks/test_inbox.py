"""Accepted transactions are applied by the workers, in order, and none is lost when the
wake-up is (a crash between commit and publish, a Redis flush)."""

from __future__ import annotations

import redis
from sqlalchemy import Engine

from directory.ingest import accept_transaction
from directory.storage import inbox
from tasks.outbox import INBOX_WAKE_KEY, wake_inbox_consumer
from tests.conftest import SERVER_NAME
from tests.support.events import member
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.processes import ProcessGroup, wait_until
from tests.tasks.conftest import entry, wait_for_name

ALICE = "@alice:remote.test"
BOB = f"@bob:{SERVER_NAME}"
ROOM = "!room:remote.test"


def backlog(engine: Engine) -> inbox.Backlog:
    with engine.connect() as conn:
        return inbox.backlog(conn)


def accept_unannounced(engine: Engine, events: list) -> None:
    """Accepted and committed, but no worker is told (the wake-up was lost)."""
    assert accept_transaction(engine, events)


def accept_and_wake(engine: Engine, events: list) -> None:
    """What the HTTP server does for each transaction."""
    assert accept_transaction(engine, events)
    wake_inbox_consumer()


def test_transactions_are_applied_in_the_order_they_were_accepted(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    processes.start_worker()
    accept_and_wake(db, [member(ROOM, BOB)])
    # Alice joins and leaves 20 times, one transaction each, each announced: however
    # the runs interleave, only the last membership (a join) may show.
    for i in range(41):
        membership = "join" if i % 2 == 0 else "leave"
        accept_and_wake(db, [member(ROOM, ALICE, membership=membership)])
    wait_until(lambda: backlog(db).transactions == 0, timeout=20)
    wait_for_name(db, ALICE, "Alice")


def test_a_worker_started_later_applies_what_was_accepted(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    accept_unannounced(db, [member(ROOM, BOB), member(ROOM, ALICE)])
    assert entry(db, ALICE) is None
    processes.start_worker()
    wait_for_name(db, ALICE, "Alice")
    assert backlog(db).transactions == 0


def test_beat_wakes_the_consumer_when_a_wake_up_was_lost(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver, redis_client: redis.Redis
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    processes.start_worker()
    processes.start_beat()
    # A stale mark says a consumer run is queued, but none is: only beat can tell.
    redis_client.set(INBOX_WAKE_KEY, 1)
    accept_and_wake(db, [member(ROOM, BOB), member(ROOM, ALICE)])
    assert backlog(db).transactions == 1
    wait_for_name(db, ALICE, "Alice")
    assert backlog(db).transactions == 0
