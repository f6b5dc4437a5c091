"""`python -m directory status [--json]`: the numbers an operator needs, from the database,
on a directory whose state was made by the hooks and by the calls the workers make."""

from __future__ import annotations

import json

from sqlalchemy import Engine

from directory.clock import now_ms
from directory.config import Settings
from directory.ingest import accept_transaction
from directory.snapshots import REPAIRS_PREFIX
from directory.storage import bootstrap as bootstrap_store
from directory.storage import counters, destinations
from directory.storage import rooms as room_store
from tests.cli.conftest import (
    ALICE,
    BOB,
    CAROL,
    DAVE,
    ERIN,
    FRANK,
    HOUR_MS,
    apply,
    claim,
    fail,
    fetched,
    run_cli,
)
from tests.support.events import join_rules, member

PUBLIC, PRIVATE, DARK = "!pub:remote.test", "!priv:remote.test", "!dark:remote.test"


def make_state(db: Engine, settings: Settings) -> None:
    apply(
        db,
        settings,
        [
            join_rules(PUBLIC, "public"),
            member(PUBLIC, BOB, displayname="Bob"),
            member(PUBLIC, ALICE, displayname="Alice"),
            member(PUBLIC, CAROL),
            join_rules(PRIVATE, "invite"),
            member(PRIVATE, BOB, displayname="Bob"),
            member(PRIVATE, DAVE),
            member(PRIVATE, ERIN),
            member(DARK, FRANK),  # no local member: not visible, no entry
        ],
    )
    fetched(db, settings, BOB, "Bob", None)  # done: no pending row left
    taken = claim(db, "remote.test")  # Alice, Carol and Dave: in flight
    fail(db, taken[CAROL], now_ms() + HOUR_MS, attempts=2)  # waiting for a retry
    fail(db, taken[DAVE], None, attempts=10)  # given up
    now = now_ms()
    with db.begin() as conn:
        # Erin stays due, behind her server's backoff.
        destinations.record_failure(conn, "other.test", now, "timeout", lambda n: now + HOUR_MS)
        for _ in range(3):
            destinations.record_failure(
                conn, "far.test", now, "connection refused", lambda n: now + 2 * HOUR_MS
            )
        run_id = bootstrap_store.create_run(conn, "admin", now - 60_000)
        bootstrap_store.add_rooms(
            conn, run_id, [(PUBLIC, None), (PRIVATE, None), ("!gone:remote.test", None)], now
        )
        bootstrap_store.listing_done(conn, run_id, now)
        bootstrap_store.rooms_loaded(conn, run_id, {PUBLIC: 3}, now)
        bootstrap_store.room_attempt_failed(
            conn, run_id, "!gone:remote.test", 5, None, "M_FORBIDDEN", now
        )
        room_store.mark_checked(conn, {PUBLIC: now + 7 * 24 * HOUR_MS}, now - 5_000)
        counters.add(conn, {REPAIRS_PREFIX + "members_added": 2, REPAIRS_PREFIX + "join_rule": 1})
    # Accepted, not applied yet.
    accept_transaction(db, [member(PUBLIC, "@zed:remote.test"), member(PUBLIC, BOB)], "t1")


def test_status_json_has_the_numbers_of_the_state(
    db: Engine, cli_settings: Settings, redis_client: object
) -> None:
    make_state(db, cli_settings)
    done = run_cli(cli_settings, "status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)

    assert status["entries"] == 5  # Bob, Alice, Carol, Dave, Erin; not Frank
    assert status["visible_rooms"] == 2
    fetches = status["pending_fetches"]
    assert {k: fetches[k] for k in ("due", "in_flight", "waiting", "given_up")} == {
        "due": 1,
        "in_flight": 1,
        "waiting": 1,
        "given_up": 1,
    }
    assert fetches["due_behind_backoff"] == 1
    assert 0 <= fetches["oldest_due_age_seconds"] < 30
    assert status["inbox"]["events"] == 2 and status["inbox"]["transactions"] == 1
    assert 0 <= status["inbox"]["oldest_age_seconds"] < 30

    assert status["backed_off_destinations"] == 2
    worst = status["worst_backoffs"]
    assert [d["server_name"] for d in worst] == ["far.test", "other.test"]  # most failures first
    assert worst[0]["consecutive_failures"] == 3 and worst[1]["consecutive_failures"] == 1
    assert 2 * 3600 - 30 < worst[0]["seconds_left"] <= 2 * 3600
    assert worst[1]["pending_users"] == 1 and worst[0]["pending_users"] == 0
    assert worst[1]["last_error"] == "timeout"

    boot = status["bootstrap"]
    assert boot["state"] == "loading" and boot["source"] == "admin"
    assert boot["rooms"] == {"listed": 3, "waiting": 1, "read": 0, "loaded": 1, "failed": 1}
    assert boot["memberships"] == 3

    checks = status["reconciliation"]
    assert checks["recheck_seconds"] == cli_settings.room_recheck_seconds
    assert checks["visible_rooms"] == 2
    assert checks["checked_recently"] == 1 and checks["never_checked"] == 1
    assert 4 <= checks["oldest_check_age_seconds"] < 60
    assert checks["repairs"] == {"join_rule": 1, "members_added": 2}
    assert sorted(status) == [
        "at_ms",
        "backed_off_destinations",
        "bootstrap",
        "entries",
        "inbox",
        "pending_fetches",
        "reconciliation",
        "visible_rooms",
        "worst_backoffs",
    ]


def test_status_text_says_the_same(
    db: Engine, cli_settings: Settings, redis_client: object
) -> None:
    make_state(db, cli_settings)
    done = run_cli(cli_settings, "status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "entries           5"
    assert lines[1] == "visible rooms     2"
    assert lines[2].startswith("pending fetches   1 due, 1 in flight, 1 waiting, 1 given up;")
    assert lines[3].strip() == "(1 due wait for their server's backoff)"
    assert lines[4].startswith("inbox             2 events in 1 transaction, oldest accepted")
    assert lines[5] == "backed off        2 destinations"
    assert lines[6].startswith("  far.test  1:59:")
    assert "3 failures in a row, 0 users waiting: connection refused" in lines[6]
    assert "1 failure in a row, 1 user waiting: timeout" in lines[7]
    assert lines[8].startswith("bootstrap         run ")
    assert lines[8].endswith(
        "rooms 1 loaded, 1 waiting, 0 read, 1 failed of 3 listed; 3 memberships"
    )
    assert lines[9].startswith(
        "reconciliation    1/2 visible rooms checked in the last 7 days, 1 never; oldest check"
    )
    assert lines[10].strip() == "repairs so far: join_rule 1, members_added 2"


def test_status_of_an_empty_directory(
    db: Engine, cli_settings: Settings, redis_client: object
) -> None:
    done = run_cli(cli_settings, "status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["entries"] == 0 and status["bootstrap"] is None
    assert status["pending_fetches"]["oldest_due_age_seconds"] is None
    assert status["inbox"] == {"events": 0, "transactions": 0, "oldest_age_seconds": None}
    assert status["worst_backoffs"] == []
    text = run_cli(cli_settings, "status")
    assert "bootstrap         never run" in text.stdout
    assert "repairs so far: none" in text.stdout


def test_status_with_the_database_away_is_one_line(cli_settings: Settings) -> None:
    from tests.conftest import with_settings

    away = with_settings(cli_settings, database_url="postgresql://postgres@127.0.0.1:1/nothing")
    done = run_cli(away, "status")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("python -m directory status: cannot reach the database")
    assert len(done.stderr.strip().splitlines()) == 1


def test_every_command_has_help(cli_settings: Settings) -> None:
    for command in ("status", "explain", "requeue", "refresh", "forget"):
        done = run_cli(cli_settings, command, "--help")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: python -m directory {command} [-h]")
    listed = run_cli(cli_settings, "--help")
    for command in ("status", "explain", "requeue", "refresh", "forget"):
        assert f"    {command} " in listed.stdout
