"""One ordered writer: a room snapshot and a batch of live events are never applied at
the same time, whichever starts first, so visibility is never computed from state the
other is changing (the race where a backfill showed a user of a private room to
strangers). Each order is forced by pausing one writer inside its transaction, just
before it first writes the directory entries, while the other tries to apply.

PostgreSQL only: SQLite has one write lock for the whole database, so no two writers
ever overlap there (and this test's probing reads would wait on the paused writer).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, event, select

from directory.config import Settings
from directory.events import ProfileValue
from directory.homeserver import RoomSnapshot
from directory.ingest import accept_snapshots, accept_transaction, apply_accepted
from directory.models import room_members, user_directory
from directory.search import search_directory
from directory.snapshots import BACKFILL, SnapshotItem
from directory.storage import rooms as room_store
from tests.conftest import SERVER_NAME
from tests.support.events import join_rules, member
from tests.support.services import selected_backend

pytestmark = pytest.mark.skipif(
    selected_backend() != "postgresql", reason="PostgreSQL: SQLite never has two writers"
)

L1 = f"@l1:{SERVER_NAME}"
L2 = f"@l2:{SERVER_NAME}"
STRANGER = f"@stranger:{SERVER_NAME}"
X = "@x:remote.test"
PUBLIC = "!p:remote.test"
PRIVATE = "!r:remote.test"
NOBODY = ProfileValue(None, None)
# How long the second writer is given to (wrongly) get through while the first waits.
OVERLAP_WINDOW_S = 1.0
_WRITES_ENTRIES = re.compile(r"^\s*(UPDATE|DELETE FROM|INSERT INTO) user_directory\b", re.I)


def apply_all(db: Engine, settings: Settings) -> None:
    while apply_accepted(db, settings, lambda _outcome: None).more:
        pass


@contextmanager
def paused_before_entries(db: Engine) -> Iterator[tuple[threading.Event, threading.Event]]:
    """In the next thread that writes directory entries (after it has read who is
    visible where): set `reached` and wait for `release` before the statement runs."""
    reached, release = threading.Event(), threading.Event()
    target: list[threading.Thread] = []

    def before(_conn, _cursor, statement: str, *_args) -> None:
        if _WRITES_ENTRIES.match(statement) and not target:
            target.append(threading.current_thread())
            reached.set()
            release.wait(timeout=30)

    event.listen(db, "before_cursor_execute", before)
    try:
        yield reached, release
    finally:
        release.set()
        event.remove(db, "before_cursor_execute", before)


def x_rooms(db: Engine) -> set[str]:
    with db.connect() as conn:
        return set(conn.scalars(select(room_members.c.room_id).where(room_members.c.user_id == X)))


def x_in_public_room(db: Engine) -> bool:
    with db.connect() as conn:
        return bool(
            conn.scalar(
                select(user_directory.c.in_public_room).where(user_directory.c.user_id == X)
            )
        )


def found(db: Engine, searcher: str) -> bool:
    with db.connect() as conn:
        return any(hit.user_id == X for hit in search_directory(conn, searcher, "x", 10).results)


def setup_rooms(db: Engine, settings: Settings) -> SnapshotItem:
    """!P public with l1 and x; l2 joins the private !R, whose snapshot (l2, x) is read."""
    accept_transaction(db, [member(PUBLIC, L1), join_rules(PUBLIC, "public"), member(PUBLIC, X)])
    accept_transaction(db, [member(PRIVATE, L2), join_rules(PRIVATE, "invite")])
    apply_all(db, settings)
    with db.connect() as conn:
        read_after = room_store.member_events(conn, PRIVATE)
    snapshot = RoomSnapshot({L2: NOBODY, X: NOBODY}, "invite", "shared")
    return SnapshotItem(PRIVATE, BACKFILL, read_after, snapshot)


def check_the_end(db: Engine) -> None:
    assert x_rooms(db) == {PRIVATE}
    assert not x_in_public_room(db)
    assert not found(db, STRANGER)
    assert found(db, L2)


def run_in_thread(target) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=guarded)
    thread.start()
    return thread, errors


def test_events_wait_while_a_snapshot_is_being_applied(db: Engine, settings: Settings) -> None:
    item = setup_rooms(db, settings)
    with db.begin() as conn:
        accept_snapshots(conn, [item])
    with paused_before_entries(db) as (reached, release):
        snapshot_writer, errors = run_in_thread(lambda: apply_all(db, settings))
        assert reached.wait(10), "the snapshot never wrote entries"
        accept_transaction(db, [member(PUBLIC, X, membership="leave")])
        events_writer, more_errors = run_in_thread(lambda: apply_all(db, settings))
        events_writer.join(OVERLAP_WINDOW_S)
        # The leave is not applied while the snapshot's transaction is open.
        assert events_writer.is_alive()
        assert PUBLIC in x_rooms(db)
        release.set()
        snapshot_writer.join(30)
        events_writer.join(30)
    assert not errors and not more_errors
    check_the_end(db)


def test_a_snapshot_waits_while_events_are_being_applied(db: Engine, settings: Settings) -> None:
    item = setup_rooms(db, settings)
    accept_transaction(db, [member(PUBLIC, X, membership="leave")])
    with paused_before_entries(db) as (reached, release):
        events_writer, errors = run_in_thread(lambda: apply_all(db, settings))
        assert reached.wait(10), "the events never wrote entries"
        with db.begin() as conn:
            accept_snapshots(conn, [item])
        snapshot_writer, more_errors = run_in_thread(lambda: apply_all(db, settings))
        snapshot_writer.join(OVERLAP_WINDOW_S)
        assert snapshot_writer.is_alive()
        assert PRIVATE not in x_rooms(db)
        release.set()
        events_writer.join(30)
        snapshot_writer.join(30)
    assert not errors and not more_errors
    check_the_end(db)


def test_the_prune_waits_for_the_writer_too(db: Engine, settings: Settings) -> None:
    """The prune removes entries of users in no visible room: judged on half-applied
    memberships it would remove a user who has just joined."""
    from directory.maintenance import prune_orphans
    from directory.storage import inbox

    setup_rooms(db, settings)
    accept_transaction(db, [member(PRIVATE, X)])
    with paused_before_entries(db) as (reached, release):
        events_writer, errors = run_in_thread(lambda: apply_all(db, settings))
        assert reached.wait(10)

        def prune() -> None:
            with db.begin() as conn:
                inbox.lock_consumer(conn)
                prune_orphans(conn)

        pruner, more_errors = run_in_thread(prune)
        pruner.join(OVERLAP_WINDOW_S)
        assert pruner.is_alive()
        release.set()
        events_writer.join(30)
        pruner.join(30)
    assert not errors and not more_errors
    assert x_rooms(db) == {PUBLIC, PRIVATE}
    assert found(db, STRANGER)
