"""One destination's run (directory.fetching) against a real HTTP server, PostgreSQL or
SQLite and Redis: results are committed in groups, each result handled as if alone
(answer, 404, user gone, re-triggered mid-fetch, transient failure), the per-user
locks of a batch are taken and released together, and a destination that backs off
ends the run with the untried users given back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from sqlalchemy import Engine, event, select

from directory.clock import now_ms
from directory.config import Settings
from directory.dedup import SeenState
from directory.events import ProfileValue
from directory.fetching import (
    LOCK_BUSY_DELAY_MS,
    DestinationRun,
    apply_results,
    user_lock_key,
)
from directory.membership import process_events
from directory.models import destinations, pending_fetches, user_directory
from directory.profile_client import FetchResult, Outcome, ProfileClient
from directory.storage import entries, pending
from tests.conftest import SERVER_NAME, with_settings
from tests.support.events import member
from tests.support.fake_homeserver import BAD_GATEWAY, FakeHomeserver

SERVER = "remote.test"


def user(name: str) -> str:
    return f"@{name}:{SERVER}"


def add_entries(engine: Engine, states: dict[str, SeenState]) -> None:
    """Placeholder entries with a fetch due now, as first sight leaves them."""
    now = now_ms()
    with engine.begin() as conn:
        entries.create_placeholders(conn, states, now, now + 3_600_000)
        pending.queue(conn, list(states), "first", now)


def seen_once(name: str) -> SeenState:
    return SeenState(ProfileValue(name, None), "!room:r")


def row(engine: Engine, table: Any, user_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        found = conn.execute(select(table).where(table.c.user_id == user_id)).one_or_none()
    return found._asdict() if found else None


def claim_all(engine: Engine) -> list[pending.Claim]:
    now = now_ms()
    with engine.begin() as conn:
        return pending.claim(conn, SERVER, now, now + 60_000, 100)


@contextmanager
def counting_commits(engine: Engine) -> Iterator[list[int]]:
    commits = [0]

    def on_commit(_conn: object) -> None:
        commits[0] += 1

    event.listen(engine, "commit", on_commit)
    try:
        yield commits
    finally:
        event.remove(engine, "commit", on_commit)


def test_a_group_is_applied_in_one_transaction_each_result_as_if_alone(
    db: Engine, settings: Settings
) -> None:
    ok, missing, left, retriggered, echoed = (
        user(n) for n in ("ok", "missing", "left", "retriggered", "echoed")
    )
    add_entries(
        db,
        {
            ok: seen_once("Ok"),
            missing: seen_once("Missing"),
            left: seen_once("Left"),
            retriggered: seen_once("Old"),
            # Seen in several rooms, yet the answer differs: ask once more.
            echoed: SeenState(ProfileValue("Echo", None), "!room:r", elsewhere=True),
        },
    )
    claims = {claim.user_id: claim for claim in claim_all(db)}
    with db.begin() as conn:
        # While the fetches were in flight: one user left, one was triggered again.
        entries.delete_entries(conn, [left])
        pending.queue(conn, [retriggered], "trigger", now_ms())
    results = [
        (claims[ok], FetchResult(Outcome.OK, ProfileValue("Ok", "mxc://a/b"))),
        (claims[missing], FetchResult(Outcome.NOT_FOUND, error="HTTP 404")),
        (claims[left], FetchResult(Outcome.OK, ProfileValue("Left", None))),
        (claims[retriggered], FetchResult(Outcome.OK, ProfileValue("Old", None))),
        (claims[echoed], FetchResult(Outcome.OK, ProfileValue("Stale", None))),
    ]

    with counting_commits(db) as commits, db.begin() as conn:
        outcome = apply_results(conn, results, settings, now_ms())
    assert commits == [1]

    assert outcome.what == {
        ok: "applied",
        missing: "applied",
        left: "discarded",
        retriggered: "applied",
        echoed: "applied",
    }
    assert not outcome.backed_off
    shown = {u: row(db, user_directory, u) for u in (ok, missing, left, retriggered, echoed)}
    assert shown[ok]["display_name"] == "Ok" and shown[ok]["avatar_url"] == "mxc://a/b"
    # 404: the placeholder, never the value the events carried.
    assert shown[missing]["display_name"] is None and shown[missing]["fetched_at_ms"]
    assert shown[left] is None  # the answer did not bring the entry back
    assert shown[retriggered]["display_name"] == "Old"
    assert shown[echoed]["display_name"] == "Stale"
    assert row(db, pending_fetches, ok) is None
    assert row(db, pending_fetches, missing) is None
    assert row(db, pending_fetches, left) is None
    # The newer trigger keeps its row, due, for one more fetch.
    newer = row(db, pending_fetches, retriggered)
    assert newer is not None and newer["generation"] == claims[retriggered].generation + 1
    assert newer["next_attempt_ms"] <= now_ms()
    recheck = row(db, pending_fetches, echoed)
    assert recheck is not None and recheck["reason"] == "recheck"


def test_a_run_fetches_a_batch_with_few_transactions_and_releases_every_lock(
    db: Engine, redis_client: redis.Redis, settings: Settings, homeserver: FakeHomeserver
) -> None:
    names = [f"user{i}" for i in range(23)]
    for name in names[:-1]:
        homeserver.set_profile(user(name), name.title())
    add_entries(db, {user(name): seen_once(name.title()) for name in names})
    settings = with_settings(settings, homeserver_url=homeserver.url, fetch_batch_size=25)

    with counting_commits(db) as commits, ProfileClient(settings) as client:
        report = DestinationRun(db, redis_client, client, settings).run(SERVER)

    assert report.applied == len(names) and report.failed == 0
    # One claim, three groups of at most ten, and the empty claim that ends the run.
    assert commits[0] <= 5
    for name in names[:-1]:
        assert row(db, user_directory, user(name))["display_name"] == name.title()
    assert row(db, user_directory, user(names[-1]))["fetched_at_ms"] is not None  # 404
    with db.connect() as conn:
        assert conn.execute(select(pending_fetches)).first() is None
    assert not redis_client.keys("ud:fetch:*")
    assert homeserver.count(server_name=SERVER) == len(names)


def test_a_user_locked_by_another_worker_is_given_back_for_later(
    db: Engine, redis_client: redis.Redis, settings: Settings, homeserver: FakeHomeserver
) -> None:
    busy, free = user("busy"), user("free")
    homeserver.set_profile(free, "Free")
    add_entries(db, {busy: seen_once("Busy"), free: seen_once("Free")})
    redis_client.set(user_lock_key(busy), "another worker", px=10_000)
    settings = with_settings(settings, homeserver_url=homeserver.url)

    before = now_ms()
    with ProfileClient(settings) as client:
        report = DestinationRun(db, redis_client, client, settings).run(SERVER)

    assert report.applied == 1
    assert homeserver.count(busy) == 0
    waiting = row(db, pending_fetches, busy)
    assert waiting is not None and waiting["attempts"] == 0
    assert waiting["next_attempt_ms"] >= before + LOCK_BUSY_DELAY_MS
    # Someone else's lock is not ours to release.
    assert redis_client.get(user_lock_key(busy)) == b"another worker"


def test_a_transient_failure_that_backs_off_the_destination_ends_the_run(
    db: Engine, redis_client: redis.Redis, settings: Settings, homeserver: FakeHomeserver
) -> None:
    names = [f"user{i:02}" for i in range(12)]
    for name in names:
        homeserver.set_profile(user(name), name.title())
    add_entries(db, {user(name): seen_once(name.title()) for name in names})
    settings = with_settings(
        settings, homeserver_url=homeserver.url, destination_failure_threshold=1
    )
    # One batch, fetched in user id order: the fifth fails.
    failing = user(names[4])
    homeserver.script(failing, BAD_GATEWAY)

    with ProfileClient(settings) as client:
        report = DestinationRun(db, redis_client, client, settings).run(SERVER)

    assert report.stopped_by_backoff
    assert (report.applied, report.failed) == (4, 1)
    with db.connect() as conn:
        health = conn.execute(select(destinations)).one()._asdict()
    assert health["consecutive_failures"] == 1 and health["retry_after_ms"] > now_ms()
    for name in names[:4]:
        assert row(db, user_directory, user(name))["display_name"] == name.title()
    failed = row(db, pending_fetches, failing)
    assert failed["attempts"] == 1 and failed["last_error"].startswith("HTTP 502")
    for name in names[5:]:
        # Given back untried: no attempt counted, due again with the destination.
        untried = row(db, pending_fetches, user(name))
        assert untried["attempts"] == 0 and untried["next_attempt_ms"] <= now_ms()
        assert homeserver.count(user(name)) == 0
    assert not redis_client.keys("ud:fetch:*")
    assert not redis_client.zcard("ud:dest:remote.test:slots")


def _process(engine: Engine, *events: dict) -> None:
    with engine.begin() as conn:
        process_events(
            conn, list(events), server_name=SERVER_NAME, now_ms=now_ms(), profile_max_age_seconds=60
        )


def _answer(engine: Engine, settings: Settings, claim: pending.Claim, result: FetchResult) -> str:
    with engine.begin() as conn:
        return apply_results(conn, [(claim, result)], settings, now_ms()).what[claim.user_id]


def ok(name: str) -> FetchResult:
    return FetchResult(Outcome.OK, ProfileValue(name, None))


def test_a_fetch_in_flight_across_a_leave_and_a_rejoin_cannot_touch_the_rejoins_fetch(
    db: Engine, settings: Settings
) -> None:
    x, room = user("x"), "!r:remote.test"
    local = f"@bob:{SERVER_NAME}"
    _process(db, member(room, local), member(room, x, displayname="Old"))
    [old] = claim_all(db)
    _process(db, member(room, x, membership="leave"))
    _process(db, member(room, x, displayname="New"))
    rejoined = row(db, pending_fetches, x)
    assert rejoined is not None and rejoined["generation"] > old.generation

    # The old claim answers "Old": its entry is gone, so it applies to nothing now...
    assert _answer(db, settings, old, ok("Old")) == "discarded"
    assert row(db, user_directory, x)["display_name"] is None
    # ...the rejoin's fetch is still due, with its whole budget...
    assert row(db, pending_fetches, x) == rejoined
    # ...and a failure of the old claim neither counts against it nor gives it up.
    with db.begin() as conn:
        apply_results(conn, [(old, FetchResult(Outcome.INVALID, error="x"))], settings, now_ms())
    assert row(db, pending_fetches, x) == rejoined

    [new] = claim_all(db)
    assert new.generation == rejoined["generation"]
    assert _answer(db, settings, new, ok("New")) == "applied"
    assert row(db, user_directory, x)["display_name"] == "New"
    assert row(db, pending_fetches, x) is None
    # Later echoes of the same value are no news: nothing is queued.
    _process(
        db, member("!other:remote.test", local), member("!other:remote.test", x, displayname="New")
    )
    assert row(db, pending_fetches, x) is None


def test_an_older_answer_landing_after_a_newer_one_is_not_applied(
    db: Engine, settings: Settings
) -> None:
    x, room = user("x"), "!r:remote.test"
    local = f"@bob:{SERVER_NAME}"
    _process(db, member(room, local), member(room, x, displayname="A"))
    [first] = claim_all(db)
    _process(db, member(room, x, displayname="B"))  # a new trigger while it is in flight
    with db.begin() as conn:
        # Due again for the new trigger; taken by another worker at once.
        [second] = pending.claim(conn, SERVER, now_ms(), now_ms() + 60_000, 10)
    assert second.generation > first.generation
    assert _answer(db, settings, second, ok("B")) == "applied"
    assert _answer(db, settings, first, ok("A")) == "discarded"
    assert row(db, user_directory, x)["display_name"] == "B"
    assert row(db, pending_fetches, x) is None


def test_parallel_failures_each_count_and_the_backoff_matches_the_count(
    db: Engine, settings: Settings
) -> None:
    """Two runs failing against one server at once: the second waits for the first's
    count, so the backoff in force is the one for both failures."""
    import threading

    from directory.fetching import destination_retry_at
    from directory.storage import destinations as destination_store

    settings = with_settings(settings, destination_failure_threshold=1)
    now = now_ms()

    def retry_at(failures: int) -> int | None:
        return destination_retry_at(settings, failures, now)

    first = db.connect()
    first.begin()
    destination_store.record_failure(first, SERVER, now, "HTTP 502", retry_at)
    second_done = threading.Event()

    def second() -> None:
        with db.begin() as conn:
            destination_store.record_failure(conn, SERVER, now, "HTTP 502", retry_at)
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    second_done.wait(0.5)
    first.commit()
    first.close()
    thread.join(10)
    with db.connect() as conn:
        health = conn.execute(
            select(destinations).where(destinations.c.server_name == SERVER)
        ).one()
    assert health.consecutive_failures == 2
    assert health.retry_after_ms == retry_at(2)
