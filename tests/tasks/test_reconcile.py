"""Room reconciliation and our homeserver's own failures, with real worker (and beat)
processes against the fake homeserver. Guarantees checked:

1. The scheduled room check (beat's recheck_rooms, rooms never checked first) repairs
   what the events missed: a member we never heard of gets an entry and their public
   profile, a member who left without our knowing loses theirs, a room that went
   private stops exposing its members to strangers; and only those differences are
   counted as `reconcile_repairs:*` (a room that was right counts none).
2. `python -m directory reconcile ROOM_ID` reads the room through the running workers
   and prints the repairs, exit 0; a room we cannot see is one line on stderr, exit 2.
3. A rejoin is read again at once, whatever Redis marks are held for the room: the
   room is private again (publicity read afresh) with its members loaded in seconds.
4. Our own homeserver refusing our token (401 M_UNKNOWN_TOKEN) or answering a bare 502
   (no Matrix error: a proxy in front of a homeserver that is down) charges nobody: the
   room's backfill mark stays, the remote user's attempts do not grow, their server is
   not backed off; once it answers again everything converges.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
from typing import Any

from redis import Redis
from sqlalchemy import Engine, select, update

from directory.clock import now_ms
from directory.config import PROJECT_ROOT, Settings
from directory.models import destinations, room_members, rooms
from directory.search import search_directory
from directory.snapshots import REPAIRS_PREFIX, SNAPSHOTS_PREFIX
from directory.storage import counters
from tasks.ingest import ingest_events
from tasks.outbox import BACKFILL_MARK_TTL_MS, backfill_queued_key
from tests.conftest import SERVER_NAME
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import ROOMS_PREFIX, FakeHomeserver, FakeRoom, Raw, error
from tests.support.processes import ProcessGroup, settings_env, wait_until
from tests.tasks.conftest import entry, pending_row, wait_for_name

BOB = f"@bob:{SERVER_NAME}"
STRANGER = f"@stranger:{SERVER_NAME}"
ALICE = "@alice:remote.test"
CAROL = "@carol:remote.test"
DAVE = "@dave:remote.test"
ERIN = "@erin:other.test"
FRANK = "@frank:other.test"
GRACE = "@grace:remote.test"

REFUSED = error(401, "M_UNKNOWN_TOKEN", "Invalid access token passed.")
# What a reverse proxy answers while the homeserver behind it is down: no Matrix error.
BARE_502 = Raw(b"<html><body>502 Bad Gateway</body></html>", status=502, content_type="text/html")


def state_path(room_id: str) -> str:
    return f"{ROOMS_PREFIX}{urllib.parse.quote(room_id, safe='')}/state"


def room_row(engine: Engine, room_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return conn.execute(select(rooms).where(rooms.c.room_id == room_id)).one()._asdict()


def members_of(engine: Engine, room_id: str) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.scalars(select(room_members.c.user_id).where(room_members.c.room_id == room_id))
        )


def totals(engine: Engine, prefix: str) -> dict[str, int]:
    with engine.connect() as conn:
        return {name[len(prefix) :]: value for name, value in counters.read(conn, prefix).items()}


def names(engine: Engine, searcher: str, term: str) -> dict[str, str]:
    with engine.connect() as conn:
        result = search_directory(conn, searcher, term, 10)
    return {hit.user_id: hit.display_name for hit in result.results}


def wait_until_checked(engine: Engine, room_ids: list[str], since_ms: int, timeout: float) -> None:
    def checked() -> bool:
        return all(
            (room_row(engine, room)["checked_at_ms"] or 0) >= since_ms
            and room_row(engine, room)["backfill_as"] is None
            for room in room_ids
        )

    wait_until(checked, timeout, what=f"{room_ids} to be read after {since_ms}")


def test_the_scheduled_check_repairs_what_events_missed_and_counts_only_that(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    drift, calm = "!drift:remote.test", "!calm:remote.test"
    for user, name in ((ALICE, "Alice"), (CAROL, "Carol"), (DAVE, "Dave"), (ERIN, "Erin")):
        homeserver.set_profile(user, name)
    # As the events will tell it: the joined rooms' backfills find nothing new.
    homeserver.set_room(
        drift, FakeRoom(members={BOB: {}, ALICE: {}, CAROL: {}}, join_rule="public")
    )
    homeserver.set_room(calm, FakeRoom(members={BOB: {}, ERIN: {}}, join_rule="public"))
    processes.env.update(ROOM_RECHECK_INTERVAL_SECONDS="1", ROOM_RECHECK_BATCH="1")
    processes.start_worker()
    started = now_ms()
    ingest_events(
        [
            join_rules(drift, "public"),
            member(drift, BOB),
            member(drift, ALICE),
            member(drift, CAROL),
            join_rules(calm, "public"),
            member(calm, BOB),
            member(calm, ERIN),
        ]
    )
    wait_until_checked(db, [drift, calm], started, 15)
    for user, name in ((ALICE, "Alice"), (CAROL, "Carol"), (ERIN, "Erin")):
        wait_for_name(db, user, name)
    assert names(db, STRANGER, "alice") == {ALICE: "Alice"}  # a public room's member
    assert totals(db, SNAPSHOTS_PREFIX) == {"backfill:applied": 2}
    assert totals(db, REPAIRS_PREFIX) == {}  # a backfill is expected to find members

    # Missed while no event reached us: Dave joined, Carol left, the room went private.
    homeserver.set_room(
        drift,
        FakeRoom(members={BOB: {}, ALICE: {}, DAVE: {}}, join_rule="invite", departed=(CAROL,)),
    )
    with db.begin() as conn:  # never checked: first in line
        conn.execute(update(rooms).values(recheck_due_ms=None))
    recheck_from = now_ms()
    processes.start_beat()
    wait_until_checked(db, [drift, calm], recheck_from, 20)
    wait_for_name(db, DAVE, "Dave")
    wait_until(lambda: entry(db, CAROL) is None, 10, what="carol's entry to go")

    assert members_of(db, drift) == {BOB, ALICE, DAVE}
    assert members_of(db, calm) == {BOB, ERIN}
    drift_row = room_row(db, drift)
    assert drift_row["join_rule"] == "invite" and not drift_row["is_public"]
    assert (drift_row["recheck_due_ms"] or 0) > now_ms() + 3600_000  # next check much later
    assert names(db, STRANGER, "alice") == {}
    assert names(db, STRANGER, "dave") == {}
    assert names(db, STRANGER, "erin") == {ERIN: "Erin"}  # the other room is still public
    assert names(db, BOB, "dave") == {DAVE: "Dave"}  # a room mate still finds him
    assert not entry(db, ALICE)["in_public_room"]
    assert totals(db, REPAIRS_PREFIX) == {"members_added": 1, "members_removed": 1, "join_rule": 1}
    # Each room read once by the check (batch of one: two runs), none twice.
    time.sleep(1.5)
    tally = totals(db, SNAPSHOTS_PREFIX)
    assert tally == {"backfill:applied": 2, "reconcile:applied": 2}


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "directory", "reconcile", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **settings_env(settings)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_reconcile_command_reads_a_room_now_and_prints_the_repairs(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver, pipeline_settings: Settings
) -> None:
    room = "!cli:remote.test"
    homeserver.set_profile(FRANK, "Frank")
    homeserver.set_room(room, FakeRoom(members={BOB: {}, ALICE: {}}, join_rule="public"))
    processes.start_worker()
    started = now_ms()
    ingest_events([join_rules(room, "public"), member(room, BOB), member(room, ALICE)])
    wait_until_checked(db, [room], started, 15)
    homeserver.set_room(
        room, FakeRoom(members={BOB: {}, FRANK: {}}, join_rule="public", departed=(ALICE,))
    )

    done = cli(pipeline_settings, room)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "reading 1 room again"
    assert lines[-1] == "repaired: members_added 1, members_removed 1"
    assert members_of(db, room) == {BOB, FRANK}
    wait_for_name(db, FRANK, "Frank")
    assert entry(db, ALICE) is None

    again = cli(pipeline_settings, room)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines()[-1] == "nothing to repair"

    unknown = cli(pipeline_settings, "!unknown:remote.test")
    assert unknown.returncode == 2
    assert unknown.stdout == ""
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert "!unknown:remote.test" in unknown.stderr
    assert totals(db, REPAIRS_PREFIX) == {"members_added": 1, "members_removed": 1}


def test_a_rejoin_is_read_again_at_once_whatever_redis_marks_hold(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver, redis_client: Redis
) -> None:
    room = "!again:remote.test"
    homeserver.set_profile(ALICE, "Alice")
    homeserver.set_room(room, FakeRoom(members={BOB: {}, ALICE: {}}, join_rule="public"))
    processes.start_worker()
    ingest_events([member(room, BOB)])
    wait_until(
        lambda: room_row(db, room)["is_public"] and ALICE in members_of(db, room),
        15,
        what="the first backfill",
    )
    wait_for_name(db, ALICE, "Alice")

    homeserver.set_room(room, FakeRoom(members={ALICE: {}}, join_rule="public", departed=(BOB,)))
    ingest_events([member(room, BOB, "leave")])
    assert not room_row(db, room)["is_visible"]
    # While we were out the room went private (no event of it reaches us).
    homeserver.set_room(room, FakeRoom(members={ALICE: {}}, join_rule="invite", departed=(BOB,)))
    homeserver.set_room(room, FakeRoom(members={BOB: {}, ALICE: {}}, join_rule="invite"))
    # A read queued from before the leave (a retry in the broker, or lost) holds a mark.
    redis_client.set(backfill_queued_key(room), 1, px=BACKFILL_MARK_TTL_MS)

    rejoined, rejoined_ms = time.monotonic(), now_ms()
    ingest_events([member(room, BOB)])
    wait_until(
        lambda: (
            (room_row(db, room)["checked_at_ms"] or 0) >= rejoined_ms
            and ALICE in members_of(db, room)
        ),
        5,
        what="the rejoined room to be read",
    )
    assert time.monotonic() - rejoined < 5
    row = room_row(db, room)
    assert row["join_rule"] == "invite"
    assert row["is_visible"] and not row["is_public"] and row["backfill_as"] is None
    assert members_of(db, room) == {BOB, ALICE}
    wait_until(lambda: entry(db, ALICE) is not None, 5, what="alice's entry")
    assert not entry(db, ALICE)["in_public_room"]
    assert names(db, STRANGER, "alice") == {}


def test_our_homeserver_refusing_us_or_down_charges_no_room_user_or_server(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    room = "!refused:remote.test"
    homeserver.set_profile(ALICE, "Alice")
    homeserver.set_profile(GRACE, "Grace")
    homeserver.set_room(room, FakeRoom(members={BOB: {}, ALICE: {}, GRACE: {}}, join_rule="public"))
    # FakeHomeserver.start() binds a fresh port, so "down" is played as a proxy would
    # answer for it: a bare 502, with no Matrix error body.
    homeserver.script_api(state_path(room), REFUSED, BARE_502)
    homeserver.script(ALICE, REFUSED, BARE_502, REFUSED)
    processes.start_worker()
    ingest_events([member(room, BOB), member(room, ALICE)])

    def reads() -> int:
        return sum(1 for read_room, _ in homeserver.room_reads if read_room == room)

    # The room read is refused, then meets the bare 502; the backfill is retried later.
    wait_until(lambda: reads() >= 2, 15, what="the second room read")
    assert room_row(db, room)["backfill_as"] == BOB
    assert GRACE not in members_of(db, room)
    # Alice's profile: 401, bare 502, 401. The third request comes after the second's
    # outcome was recorded.
    wait_until(lambda: homeserver.count(ALICE) >= 3, 20, what="the third profile request")
    assert pending_row(db, ALICE)["attempts"] == 0
    assert entry(db, ALICE)["fetched_at_ms"] is None
    with db.connect() as conn:
        health = conn.execute(
            select(destinations).where(destinations.c.server_name == "remote.test")
        ).one_or_none()
    assert health is None or (health.consecutive_failures == 0 and health.retry_after_ms is None)
    assert room_row(db, room)["backfill_as"] == BOB

    # Answering normally again: everything converges.
    wait_for_name(db, ALICE, "Alice", timeout=20)
    wait_for_name(db, GRACE, "Grace", timeout=20)
    row = room_row(db, room)
    assert row["backfill_as"] is None and row["is_public"]
    assert members_of(db, room) == {BOB, ALICE, GRACE}
    assert pending_row(db, ALICE) is None
    assert reads() == 3
    with db.connect() as conn:
        health = conn.execute(
            select(destinations).where(destinations.c.server_name == "remote.test")
        ).one_or_none()
    assert health is None or (health.consecutive_failures == 0 and health.retry_after_ms is None)
