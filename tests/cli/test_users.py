"""`python -m directory requeue | refresh | forget`, run as an operator runs them against
state made through the hooks: requeued work is due now and published, a refresh is a
fresh fetch that a worker carries out, and a forgotten user leaves nothing behind (and
comes back as a new user when seen again)."""

from __future__ import annotations

import time
from typing import Any

from redis import Redis
from sqlalchemy import Engine, func, select

from directory.clock import now_ms
from directory.config import Settings
from directory.models import destinations as destinations_table
from directory.models import event_inbox, rooms
from directory.storage import bootstrap as bootstrap_store
from directory.storage import destinations, inbox, pending
from tasks.app import FETCH_QUEUE
from tasks.outbox import queued_key
from tests.cli.conftest import (
    ALICE,
    BOB,
    CAROL,
    DAVE,
    ERIN,
    GINA,
    HANK,
    HOUR_MS,
    apply,
    claim,
    fail,
    fetched,
    popen_cli,
    rows_mentioning,
    run_cli,
)
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import FakeHomeserver, FakeRoom
from tests.support.processes import ProcessGroup
from tests.tasks.conftest import entry, pending_row, wait_for_name

LOBBY, PRIVATE, DARK, SOLO = (
    "!lobby:remote.test",
    "!priv:remote.test",
    "!dark:remote.test",
    "!solo:remote.test",
)


def destination(engine: Engine, server: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(destinations_table).where(destinations_table.c.server_name == server)
        ).one_or_none()
    return row._asdict() if row else None


def published_fetch_runs(redis_client: Redis) -> int:
    return int(redis_client.llen(FETCH_QUEUE))


def failing_state(db: Engine, settings: Settings) -> dict[str, pending.Claim]:
    """On remote.test: Alice given up, Carol waiting for a retry, Dave due, the server
    backed off; on other.test: Erin given up."""
    apply(
        db,
        settings,
        [
            join_rules(LOBBY, "invite"),
            member(LOBBY, BOB),
            member(LOBBY, ALICE),
            member(LOBBY, CAROL),
            member(LOBBY, DAVE),
            member(LOBBY, ERIN),
        ],
    )
    taken = claim(db, "remote.test")
    fail(db, taken[ALICE], None, attempts=10)
    fail(db, taken[CAROL], now_ms() + HOUR_MS, attempts=4)
    with db.begin() as conn:
        pending.postpone(conn, [taken[DAVE]], now_ms(), None)
    fail(db, claim(db, "other.test")[ERIN], None, attempts=10)
    now = now_ms()
    with db.begin() as conn:
        for _ in range(4):
            destinations.record_failure(
                conn, "remote.test", now, "timeout", lambda n: now + HOUR_MS
            )
    return taken


def test_requeue_server_makes_its_users_due_clears_the_backoff_and_publishes(
    db: Engine, cli_settings: Settings, redis_client: Redis
) -> None:
    failing_state(db, cli_settings)
    done = run_cli(cli_settings, "requeue", "--server", "remote.test")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "2 users became due now (1 was due already; attempts start over);"
        " the backoff of remote.test is cleared"
    ]
    for user in (ALICE, CAROL, DAVE):
        row = pending_row(db, user)
        assert row is not None and row["attempts"] == 0
        assert row["next_attempt_ms"] is not None and row["next_attempt_ms"] <= now_ms()
    assert pending_row(db, ERIN)["next_attempt_ms"] is None  # another server: untouched
    health = destination(db, "remote.test")
    assert health["retry_after_ms"] is None and health["consecutive_failures"] == 0
    # Fetch runs were published for it, after the commit.
    assert redis_client.exists(queued_key("remote.test"))
    assert published_fetch_runs(redis_client) >= 1

    nothing = run_cli(cli_settings, "requeue", "--server", "quiet.test")
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stdout.splitlines() == [
        "0 users became due now",
        "nothing was pending for quiet.test, and it was not backed off",
    ]
    bad = run_cli(cli_settings, "requeue", "--server", "a b")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "python -m directory requeue: not a valid server name: 'a b'\n"


def test_requeue_one_user_or_every_given_up_one(
    db: Engine, cli_settings: Settings, redis_client: Redis
) -> None:
    failing_state(db, cli_settings)
    one = run_cli(cli_settings, "requeue", CAROL)
    assert one.returncode == 0, one.stderr
    lines = one.stdout.splitlines()
    assert lines[0] == "1 user became due now"
    assert lines[1].startswith("remote.test is backed off for 0:59:")
    assert lines[1].endswith(
        "its users wait for it (`python -m directory requeue --server remote.test` clears it)"
    )
    assert pending_row(db, CAROL)["attempts"] == 0
    assert pending_row(db, ALICE)["next_attempt_ms"] is None  # only Carol

    given_up = run_cli(cli_settings, "requeue", "--given-up")
    assert given_up.returncode == 0, given_up.stderr
    assert given_up.stdout.splitlines()[0] == "2 users became due now"  # Alice and Erin
    for user in (ALICE, ERIN):
        assert pending_row(db, user)["next_attempt_ms"] <= now_ms()
    assert destination(db, "remote.test")["retry_after_ms"] is not None  # still backed off
    assert redis_client.exists(queued_key("other.test"))

    unknown = run_cli(cli_settings, "requeue", "@nobody:remote.test")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert len(unknown.stderr.splitlines()) == 1
    assert "@nobody:remote.test is unknown" in unknown.stderr
    fetched(db, cli_settings, BOB, None, None)
    no_pending = run_cli(cli_settings, "requeue", BOB)
    assert no_pending.returncode == 1
    assert no_pending.stderr == (
        f"python -m directory requeue: {BOB} has no pending fetch;"
        f" `python -m directory refresh {BOB}` queues a fresh one\n"
    )


def test_refresh_fetches_the_public_profile_again_now(
    db: Engine,
    processes: ProcessGroup,
    homeserver: FakeHomeserver,
    pipeline_settings: Settings,
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    homeserver.set_room(LOBBY, FakeRoom(members={BOB: {}, ALICE: {}}, join_rule="invite"))
    processes.start_worker()
    from tasks.ingest import ingest_events

    ingest_events([join_rules(LOBBY, "invite"), member(LOBBY, BOB), member(LOBBY, ALICE)])
    wait_for_name(db, ALICE, "Alice")
    generation = entry(db, ALICE)["fetched_generation"]
    homeserver.set_profile(ALICE, "Alice Liddell")  # no event tells us

    done = run_cli(pipeline_settings, "refresh", ALICE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{ALICE}: a fresh fetch of their public profile is due now\n"
    wait_for_name(db, ALICE, "Alice Liddell")
    assert entry(db, ALICE)["fetched_generation"] > generation

    missing = run_cli(pipeline_settings, "refresh", "@nobody:remote.test")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == (
        "python -m directory refresh: @nobody:remote.test has no entry, so nothing to refresh"
        " (`python -m directory explain @nobody:remote.test` says why)\n"
    )


def test_refresh_queues_a_new_generation_due_now(
    db: Engine, cli_settings: Settings, redis_client: Redis
) -> None:
    apply(db, cli_settings, [member(LOBBY, BOB), member(LOBBY, ALICE, displayname="Alice")])
    fetched(db, cli_settings, ALICE, "Alice", None)
    assert pending_row(db, ALICE) is None
    shown = entry(db, ALICE)["fetched_generation"]
    done = run_cli(cli_settings, "refresh", ALICE)
    assert done.returncode == 0, done.stderr
    row = pending_row(db, ALICE)
    assert row["reason"] == "refresh" and row["attempts"] == 0
    assert row["next_attempt_ms"] <= now_ms() and row["generation"] > shown
    assert redis_client.exists(queued_key("remote.test"))
    assert published_fetch_runs(redis_client) >= 1


def forget_state(db: Engine, settings: Settings) -> None:
    """Alice in a public room, a private room where she has another name and avatar,
    and a room we cannot see; a refresh of hers pending. Gina, a local user, is the
    only local member of a room with Hank, and named in a bootstrap run."""
    apply(
        db,
        settings,
        [
            join_rules(LOBBY, "public"),
            member(LOBBY, BOB),
            member(LOBBY, ALICE, displayname="Alice"),
            member(PRIVATE, BOB),
            member(PRIVATE, ALICE, displayname="Secret Alice", avatar_url="mxc://x/secret"),
            member(DARK, ALICE, displayname="Dark Alice"),
            member(SOLO, GINA, displayname="Gina here"),
            member(SOLO, HANK),
        ],
    )
    fetched(db, settings, ALICE, "Alice", "mxc://remote.test/alice")
    now = now_ms()
    with db.begin() as conn:
        pending.queue(conn, [ALICE], "refresh", now)
        run_id = bootstrap_store.create_run(conn, "users", now, [GINA])
        bootstrap_store.add_rooms(conn, run_id, [(SOLO, GINA)], now)


def test_forget_erases_everything_held_and_a_user_seen_again_is_new(
    db: Engine, cli_settings: Settings, redis_client: Redis
) -> None:
    forget_state(db, cli_settings)
    old_generation = pending_row(db, ALICE)["generation"]
    assert rows_mentioning(db, ALICE)  # entry, pending fetch, three member rows

    done = run_cli(cli_settings, "forget", ALICE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        f"forgot {ALICE}: entry 1, pending fetch 1, memberships 3 (3 with a per-room name or"
        " avatar)",
        f"they are still in the rooms they were in ({DARK}, {LOBBY}, {PRIVATE}): events still"
        " arriving for those rooms, or a room's scheduled check, will bring them back as a new"
        " user (a placeholder and a fresh fetch)",
    ]
    assert rows_mentioning(db, ALICE) == []
    assert rows_mentioning(db, "Secret Alice") == []
    assert rows_mentioning(db, "Dark Alice") == []
    assert entry(db, BOB) is not None  # nobody else is touched

    # Seen again: a new user, with a placeholder and a fetch of their public profile.
    apply(db, cli_settings, [member(PRIVATE, ALICE, displayname="Secret Alice")])
    again = entry(db, ALICE)
    assert again is not None
    assert again["fetched_at_ms"] is None and again["display_name"] is None
    row = pending_row(db, ALICE)
    assert row is not None and row["reason"] == "event" and row["generation"] > old_generation
    assert row["next_attempt_ms"] <= now_ms()

    twice = run_cli(cli_settings, "forget", "@nobody:remote.test")
    assert twice.returncode == 1 and twice.stdout == ""
    assert twice.stderr == (
        "python -m directory forget: @nobody:remote.test is unknown: nothing is held for them\n"
    )


def test_forgetting_a_rooms_last_local_member_hides_the_room(
    db: Engine, cli_settings: Settings, redis_client: Redis
) -> None:
    forget_state(db, cli_settings)
    with db.connect() as conn:
        assert conn.scalar(select(rooms.c.backfill_as).where(rooms.c.room_id == SOLO)) == GINA
    assert entry(db, HANK) is not None

    done = run_cli(cli_settings, "forget", GINA)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"forgot {GINA}: entry 1, pending fetch 1, memberships 1 (1 with a per-room name or avatar)"
    )
    assert lines[1] == (
        "  with them: 1 room no longer visible (they were its last local member),"
        " 1 other entry removed"
    )
    assert lines[2] == "  2 room or bootstrap rows no longer name them"  # listed, reads as
    assert rows_mentioning(db, GINA) == []
    assert entry(db, HANK) is None  # in no room we can see any more
    with db.connect() as conn:
        solo = conn.execute(select(rooms).where(rooms.c.room_id == SOLO)).one()
    assert not solo.is_visible and solo.backfill_as is None


def test_forget_waits_for_the_inbox_consumer_and_mentions_the_backlog(
    db: Engine, cli_settings: Settings, redis_client: Redis
) -> None:
    forget_state(db, cli_settings)
    with db.begin() as conn:
        inbox.append(conn, b"not applied", 2, now_ms())
    with db.connect() as conn:
        transaction = conn.begin()
        inbox.lock_consumer(conn)  # a consumer applying a batch (SQLite: the write lock)
        forgetting = popen_cli(cli_settings, "forget", ALICE)
        time.sleep(2.0)
        assert forgetting.poll() is None, forgetting.communicate()
        if db.dialect.name == "postgresql":  # SQLite: every transaction waits, reads too
            assert entry(db, ALICE) is not None
        transaction.commit()
    out, err = forgetting.communicate(timeout=60)
    assert forgetting.returncode == 0, err
    assert entry(db, ALICE) is None
    assert out.splitlines()[-1] == (
        "the inbox holds 2 events not applied yet: any of theirs brings them back too"
    )
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(event_inbox)) == 1
