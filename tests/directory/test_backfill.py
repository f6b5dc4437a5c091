"""Applying a room snapshot: it adds the members events never told us about, removes
those gone, and is refused when member events arrived while it was being read (so a
stale snapshot never undoes a newer join)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from directory.backfill import RoomSnapshot, SnapshotStale, apply_snapshot
from directory.clock import now_ms
from directory.events import ProfileValue
from directory.membership import process_events
from directory.storage import rooms as room_store
from tests.conftest import SERVER_NAME
from tests.support.events import member

BOB = f"@bob:{SERVER_NAME}"
EVE = f"@eve:{SERVER_NAME}"
ALICE = "@alice:remote.test"
GONE = "@gone:remote.test"
ROOM = "!r:remote.test"


def ingest(db: Engine, events: list) -> None:
    with db.begin() as conn:
        process_events(
            conn, events, server_name=SERVER_NAME, now_ms=now_ms(), profile_max_age_seconds=60
        )


def counter(db: Engine) -> int | None:
    with db.connect() as conn:
        return room_store.member_events(conn, ROOM)


def apply(db: Engine, snapshot: RoomSnapshot, read_after: int | None):
    with db.begin() as conn:
        return apply_snapshot(
            conn,
            ROOM,
            snapshot,
            read_after=read_after,
            server_name=SERVER_NAME,
            now_ms=now_ms(),
            profile_max_age_seconds=60,
        )


def members(db: Engine) -> set[str]:
    with db.connect() as conn:
        return room_store.members_of(conn, {ROOM})


def test_a_snapshot_adds_unknown_members_and_removes_departed_ones(db: Engine) -> None:
    ingest(db, [member(ROOM, GONE)])
    ingest(db, [member(ROOM, BOB)])
    snapshot = RoomSnapshot(
        joined={BOB: ProfileValue(None, None), ALICE: ProfileValue("Delia", None)},
        join_rule="public",
        history_visibility="shared",
    )
    outcome = apply(db, snapshot, counter(db))
    assert members(db) == {BOB, ALICE}
    assert outcome.fetch_servers == {"remote.test": 1}
    with db.connect() as conn:
        assert room_store.backfill_reader(conn, ROOM) is None


def test_a_snapshot_read_before_newer_events_is_refused(db: Engine) -> None:
    ingest(db, [member(ROOM, BOB)])
    read_after = counter(db)
    snapshot = RoomSnapshot(
        joined={BOB: ProfileValue(None, None)}, join_rule=None, history_visibility=None
    )
    ingest(db, [member(ROOM, EVE)])  # eve joined after the snapshot was read
    with pytest.raises(SnapshotStale):
        apply(db, snapshot, read_after)
    assert members(db) == {BOB, EVE}  # the snapshot would have taken eve for gone
