"""Room backfill: when our server joins a room, its existing members (never replayed
by the homeserver) are loaded through the client API as the local member, and go
through the same hooks: their per-room names are only triggers."""

from __future__ import annotations

from sqlalchemy import Engine, select

from directory.models import rooms
from tasks.ingest import ingest_events
from tests.conftest import SERVER_NAME
from tests.support.events import member
from tests.support.fake_homeserver import FakeHomeserver, FakeRoom
from tests.support.processes import ProcessGroup, wait_until
from tests.tasks.conftest import entry, wait_for_name

ALICE = "@alice:remote.test"
CAROL = "@carol:other.test"
GONE = "@gone:remote.test"
BOB = f"@bob:{SERVER_NAME}"
EVE = f"@eve:{SERVER_NAME}"


def test_joining_a_room_loads_its_members_and_their_public_profiles(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    homeserver.set_profile(CAROL, "Carol")
    homeserver.set_room(
        "!big:remote.test",
        FakeRoom(
            members={
                BOB: {"display_name": "Bob"},
                ALICE: {"display_name": "Delia", "avatar_url": "mxc://x/delia"},
                CAROL: {},
            },
            join_rule="public",
        ),
    )
    processes.start_worker()
    # We knew GONE from an earlier event while the room was not visible to us.
    ingest_events([member("!big:remote.test", GONE)])
    ingest_events([member("!big:remote.test", BOB)])
    wait_for_name(db, ALICE, "Alice")
    wait_for_name(db, CAROL, "Carol")
    assert ("!big:remote.test", BOB) in homeserver.room_reads
    assert entry(db, GONE) is None  # not in the room any more
    assert entry(db, ALICE)["in_public_room"]  # the join rule came with the backfill
    with db.connect() as conn:
        mark = conn.scalar(select(rooms.c.backfill_as).where(rooms.c.room_id == "!big:remote.test"))
    assert mark is None


def test_a_backfill_reads_as_another_local_member_if_the_first_cannot(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    homeserver.set_room(
        "!r:remote.test", FakeRoom(members={EVE: {}, ALICE: {"display_name": "Delia"}})
    )
    processes.start_worker()
    ingest_events([member("!r:remote.test", BOB), member("!r:remote.test", EVE)])
    wait_for_name(db, ALICE, "Alice")
    reads = [user for room, user in homeserver.room_reads if room == "!r:remote.test"]
    assert reads[0] == BOB and EVE in reads
    wait_until(lambda: entry(db, BOB) is None, 10, what="bob, absent from the room, to go")
