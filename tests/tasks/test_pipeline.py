"""The pipeline end to end: events in through the hooks, real Celery workers fetching
public profiles from a real HTTP server, entries out through search (docs/design.md §8,
scenarios 1-7, 9, 11, 12). Each test runs real worker processes on the test database
and a private Redis."""

from __future__ import annotations

import itertools
import signal
import time

import redis
from sqlalchemy import Engine, select

from directory.clock import now_ms
from directory.config import Settings
from directory.membership import process_events
from directory.models import pending_fetches
from directory.search import search_directory
from tasks.ingest import ingest_events
from tests.conftest import SERVER_NAME
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import BAD_GATEWAY, FakeHomeserver, Hang, Raw, Reply, error
from tests.support.processes import ProcessGroup, wait_until
from tests.tasks.conftest import entry, pending_row, wait_for_name, wait_for_no_pending

ALICE = "@alice:remote.test"
BOB = f"@bob:{SERVER_NAME}"
EVE = f"@eve:{SERVER_NAME}"
PUBLIC = "!public:remote.test"
PRIVATE = "!private:remote.test"


def commit_without_publishing(engine: Engine, events: list) -> None:
    """The hooks' transaction alone, as if the process died before publishing."""
    with engine.begin() as conn:
        process_events(
            conn, events, server_name=SERVER_NAME, now_ms=now_ms(), profile_max_age_seconds=3600
        )


def names(engine: Engine, searcher: str, term: str) -> dict[str, str | None]:
    with engine.connect() as conn:
        result = search_directory(conn, searcher, term, 10)
    return {hit.user_id: hit.display_name for hit in result.results}


def test_per_room_name_never_leaks_alice_delia(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """Scenario 1: Alice's per-room "Delia" is neither shown nor searchable."""
    homeserver.set_profile(ALICE, "Alice")
    homeserver.set_profile(BOB, "Bob")
    homeserver.set_profile(EVE, "Eve")
    processes.start_worker()
    ingest_events(
        [
            join_rules(PUBLIC, "public"),
            member(PUBLIC, BOB, displayname="Bob"),
            member(PUBLIC, EVE, displayname="Eve"),
            member(PUBLIC, ALICE, displayname="Alice"),
            member(PRIVATE, BOB, displayname="Bob"),
            member(PRIVATE, ALICE, displayname="Alice"),
        ]
    )
    wait_for_name(db, ALICE, "Alice")
    ingest_events([member(PRIVATE, ALICE, displayname="Delia")])
    # The per-room name triggers one fetch, which answers the public name again.
    wait_until(lambda: homeserver.count(ALICE) == 2, 10, what="the Delia-triggered fetch")
    wait_for_no_pending(db)

    assert names(db, EVE, ALICE) == {ALICE: "Alice"}
    assert names(db, EVE, "alice") == {ALICE: "Alice"}
    assert names(db, EVE, "delia") == {}
    assert names(db, BOB, "delia") == {}
    assert entry(db, ALICE)["display_name"] == "Alice"


def test_first_sight_is_a_searchable_placeholder_until_the_fetch_lands(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """Scenario 2, with a per-room name set in a PUBLIC room (Synapse would show it)."""
    homeserver.set_profile(ALICE, "Alice")
    homeserver.set_server("remote.test", latency=0.5)
    processes.start_worker()
    ingest_events(
        [
            join_rules(PUBLIC, "public"),
            member(PUBLIC, BOB),
            member(PUBLIC, ALICE, displayname="Pubby"),
        ]
    )
    # At once, before any fetch answered: found by user id, showing nothing private
    # (a placeholder has no display name).
    assert names(db, EVE, "alice") == {ALICE: None}
    assert names(db, EVE, "pubby") == {}
    wait_for_name(db, ALICE, "Alice")
    assert names(db, EVE, "alice") == {ALICE: "Alice"}
    assert names(db, EVE, "pubby") == {}


def test_one_rename_echoed_into_500_rooms_costs_one_request(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """Scenario 3: deduplication across rooms and across batches."""
    rooms = [f"!room{i}:remote.test" for i in range(500)]
    homeserver.set_profile(ALICE, "Alice")
    processes.start_worker()
    joins = [member(r, BOB) for r in rooms] + [member(r, ALICE, displayname="Alice") for r in rooms]
    for start in range(0, len(joins), 100):
        ingest_events(joins[start : start + 100])
    wait_for_name(db, ALICE, "Alice")
    wait_for_no_pending(db)
    assert homeserver.count(ALICE) == 1

    homeserver.set_profile(ALICE, "Alicia")
    renames = [member(r, ALICE, displayname="Alicia") for r in rooms]
    for start in range(0, len(renames), 100):
        ingest_events(renames[start : start + 100])
    wait_for_name(db, ALICE, "Alicia")
    wait_for_no_pending(db)
    assert homeserver.count(ALICE) == 2


def test_global_change_to_a_value_once_seen_per_room_is_fetched(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """Scenario 4: dedup never swallows a value for good."""
    homeserver.set_profile(ALICE, "Alice")
    processes.start_worker()
    ingest_events(
        [
            member("!a:r", BOB),
            member("!p:r", BOB),
            member("!a:r", ALICE, displayname="Alice"),
            member("!p:r", ALICE, displayname="Alice"),
        ]
    )
    wait_for_name(db, ALICE, "Alice")
    ingest_events([member("!p:r", ALICE, displayname="Delia")])  # per-room, in !p only
    wait_until(lambda: homeserver.count(ALICE) == 2, 10, what="the per-room fetch")
    wait_for_no_pending(db)
    assert entry(db, ALICE)["display_name"] == "Alice"

    homeserver.set_profile(ALICE, "Delia")  # now global, echoed into every room
    ingest_events([member("!a:r", ALICE, displayname="Delia")])
    ingest_events([member("!p:r", ALICE, displayname="Delia")])
    wait_for_name(db, ALICE, "Delia")


def test_transient_failures_retry_with_growing_delays_then_converge(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver, pipeline_settings: Settings
) -> None:
    """Scenario 5: 502, 502, timeout, then an answer."""
    processes.env.update(
        FETCH_RETRY_BASE_SECONDS="0.5", FETCH_RETRY_FACTOR="2", DESTINATION_FAILURE_THRESHOLD="10"
    )
    homeserver.set_profile(ALICE, "Alice")
    homeserver.script(ALICE, BAD_GATEWAY, BAD_GATEWAY, Hang(3.0))
    processes.start_worker()
    ingest_events([member(PRIVATE, BOB), member(PRIVATE, ALICE, displayname="Delia")])
    wait_for_name(db, ALICE, "Alice", timeout=30)
    starts = [r.started for r in homeserver.requests if r.user_id == ALICE]
    assert len(starts) == 4
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Waits of 0.5 s, 1 s, then 2 s (after a 1 s read timeout): each longer than the last.
    assert gaps[0] >= 0.45
    assert gaps[1] >= 0.95 and gaps[1] > gaps[0] * 1.5
    assert gaps[2] >= 2.9
    assert pending_row(db, ALICE) is None


def test_gives_up_after_max_attempts_and_leaves_the_entry_as_it_was(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """Scenario 5, the other half: bounded attempts, then the entry stays."""
    processes.env.update(MAX_FETCH_ATTEMPTS="3", DESTINATION_FAILURE_THRESHOLD="10")
    homeserver.set_profile(ALICE, "Alice")
    processes.start_worker()
    ingest_events([member(PRIVATE, BOB), member(PRIVATE, ALICE, displayname="Alice")])
    wait_for_name(db, ALICE, "Alice")

    homeserver.set_profile(ALICE, "Alicia")
    homeserver.set_server("remote.test", down=True)
    homeserver.reset_records()
    ingest_events([member(PRIVATE, ALICE, displayname="Alicia")])
    wait_until(
        lambda: (pending_row(db, ALICE) or {}).get("attempts") == 3, 20, what="three attempts"
    )
    row = pending_row(db, ALICE)
    assert row["next_attempt_ms"] is None  # given up
    time.sleep(2)
    assert homeserver.count(ALICE) == 3
    assert entry(db, ALICE)["display_name"] == "Alice"


def test_dead_destination_shares_one_backoff_and_all_converge_when_it_returns(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """Scenario 6."""
    users = [f"@user{i}:dead.test" for i in range(30)]
    for user in users:
        homeserver.set_profile(user, user[1:7].title())
    homeserver.set_server("dead.test", down=True)
    processes.env.update(MAX_FETCH_ATTEMPTS="3")
    processes.start_worker()
    processes.start_beat()
    ingest_events([member("!room:r", BOB)] + [member("!room:r", u) for u in users])
    time.sleep(4)
    # Without a shared backoff each user would be tried MAX_FETCH_ATTEMPTS times (90).
    dead_requests = homeserver.count(server_name="dead.test")
    assert 0 < dead_requests < len(users)

    homeserver.set_server("dead.test", down=False)
    for user in users:
        wait_for_name(db, user, user[1:7].title(), timeout=30)
    wait_for_no_pending(db)


def test_leave_removes_the_entry_and_a_fetch_in_flight_does_not_restore_it(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """Scenario 7."""
    processes.env.update(FETCH_READ_TIMEOUT_SECONDS="5")
    homeserver.set_profile(ALICE, "Alice")
    homeserver.script(ALICE, Hang(2.0))
    processes.start_worker()
    ingest_events([member(PRIVATE, BOB), member(PRIVATE, ALICE, displayname="Alice")])
    wait_until(lambda: homeserver.count(ALICE) == 1, 10, what="the fetch to start")
    ingest_events([member(PRIVATE, ALICE, membership="leave")])
    assert entry(db, ALICE) is None
    time.sleep(3)  # the answer lands after the leave
    assert entry(db, ALICE) is None
    assert pending_row(db, ALICE) is None
    assert names(db, BOB, "alice") == {}


def test_restart_after_sigkill_and_redis_flush_loses_nothing(
    db: Engine,
    processes: ProcessGroup,
    homeserver: FakeHomeserver,
    redis_client: redis.Redis,
) -> None:
    """Scenario 9: every worker and beat SIGKILLed, Redis flushed, fetches pending."""
    users = [f"@user{i}:slow{i % 3}.test" for i in range(30)]
    for user in users:
        homeserver.set_profile(user, f"Name {user[5:7]}")
    for i in range(3):
        homeserver.set_server(f"slow{i}.test", latency=0.3)
    processes.start_worker("worker1")
    processes.start_beat()
    ingest_events([member("!room:r", BOB)] + [member("!room:r", u) for u in users])
    wait_until(lambda: homeserver.count() >= 3, 10, what="some fetches to start")

    processes.kill_all(signal.SIGKILL)
    redis_client.flushall()
    with db.connect() as conn:
        still_pending = conn.execute(select(pending_fetches.c.user_id)).all()
    assert still_pending, "the test must kill the workers with fetches pending"

    processes.start_worker("worker2")
    processes.start_beat("beat2")
    for user in users:
        wait_for_name(db, user, f"Name {user[5:7]}", timeout=40)
    wait_for_no_pending(db)


def test_not_found_and_forbidden_keep_the_placeholder(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """Scenario 11."""
    hidden = "@hidden:remote.test"
    homeserver.script(hidden, error(403, "M_FORBIDDEN", "Profile lookup is disabled"))
    processes.start_worker()
    ingest_events(
        [
            member(PRIVATE, BOB),
            member(PRIVATE, ALICE, displayname="Delia"),
            member(PRIVATE, hidden, displayname="Secret"),
        ]
    )
    wait_for_name(db, ALICE, None)
    wait_for_name(db, hidden, None)
    wait_for_no_pending(db)
    assert names(db, BOB, "alice") == {ALICE: None}
    assert names(db, BOB, "hidden") == {hidden: None}
    assert names(db, BOB, "delia") == {}
    assert names(db, BOB, "secret") == {}


def test_hostile_answers_cost_bounded_time_and_change_nothing(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """Scenario 12: each hostile answer fails the attempt; the entry keeps its value."""
    processes.env.update(MAX_FETCH_ATTEMPTS="1", FETCH_READ_TIMEOUT_SECONDS="1")
    hostile = {
        "@huge:evil.test": Raw(b"x" * 65536, repeat=160),  # 10 MB
        "@notjson:evil.test": Raw(b"{not json"),
        "@types:evil.test": Reply(200, {"displayname": ["a"], "avatar_url": 5}),
        "@long:evil.test": Reply(200, {"displayname": "A" * 100_000}),
        "@nul:evil.test": Reply(200, {"displayname": "Ev\u0000il"}),
        "@silent:evil.test": Hang(30.0),
    }
    for user, answer in hostile.items():
        homeserver.set_profile(user, "Public")
        homeserver.script(user, answer)
    processes.env.update(DESTINATION_FAILURE_THRESHOLD="10")
    processes.start_worker()
    started = time.monotonic()
    ingest_events([member(PRIVATE, BOB)] + [member(PRIVATE, u, displayname="X") for u in hostile])

    def all_given_up() -> bool:
        rows = [pending_row(db, u) for u in hostile]
        return all(r is not None and r["next_attempt_ms"] is None for r in rows)

    wait_until(all_given_up, 20, what="every hostile fetch to fail")
    assert time.monotonic() - started < 15
    for user in hostile:
        found = entry(db, user)
        assert found["display_name"] is None and found["fetched_at_ms"] is None, user


def test_worker_start_rebuilds_the_queue_from_the_database(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """The pending table is the outbox: rows committed with no publish at all (as after
    a crash between commit and publish) are fetched once a worker starts."""
    homeserver.set_profile(ALICE, "Alice")
    commit_without_publishing(db, [member(PRIVATE, BOB), member(PRIVATE, ALICE)])
    processes.start_worker()
    wait_for_name(db, ALICE, "Alice")


def test_beat_republishes_work_lost_while_workers_run(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """A lost publish while everything runs is repaired by beat's reconciliation."""
    homeserver.set_profile(ALICE, "Alice")
    processes.start_worker()
    processes.start_beat()
    time.sleep(1)
    commit_without_publishing(db, [member(PRIVATE, BOB), member(PRIVATE, ALICE)])
    wait_for_name(db, ALICE, "Alice")


def test_concurrency_per_destination_is_bounded_across_workers(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """At most PER_DESTINATION_CONCURRENCY requests in flight to one server, however
    many workers; other servers proceed meanwhile."""
    busy = [f"@u{i}:busy.test" for i in range(40)]
    other = [f"@u{i}:other.test" for i in range(5)]
    for user in busy + other:
        homeserver.set_profile(user, "Someone")
    homeserver.set_server("busy.test", latency=0.2, max_concurrent=3)
    processes.env.update(FETCH_BATCH_SIZE="5")
    processes.start_worker("worker1")
    processes.start_worker("worker2")
    ingest_events([member("!room:r", BOB)] + [member("!room:r", u) for u in busy + other])
    for user in other:
        wait_for_name(db, user, "Someone", timeout=10)
    assert homeserver.count(server_name="busy.test") < len(busy)  # not blocked behind busy
    for user in busy:
        wait_for_name(db, user, "Someone", timeout=30)
    assert homeserver.max_in_flight("busy.test") <= 3
    assert homeserver.rate_limited_count() == 0
