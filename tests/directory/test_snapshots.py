"""Room snapshots through the inbox: applied in order with the events around them by the
one consumer, through the same hooks (per-room values stay triggers), refused when
events arrived while they were read, failing closed on publicity, and counting what a
reconciliation repairs."""

from __future__ import annotations

from sqlalchemy import Engine, select

from directory.config import Settings
from directory.events import ProfileValue
from directory.homeserver import RoomSnapshot
from directory.ingest import accept_snapshots, accept_transaction, apply_accepted
from directory.membership import BatchOutcome
from directory.models import rooms, user_directory
from directory.search import search_directory
from directory.snapshots import BACKFILL, RECONCILE, REPAIRS_PREFIX, SnapshotItem
from directory.storage import counters
from directory.storage import rooms as room_store
from tests.conftest import SERVER_NAME
from tests.support.events import history_visibility, join_rules, member
from tests.support.state import entry_ids

BOB = f"@bob:{SERVER_NAME}"
EVE = f"@eve:{SERVER_NAME}"
DAVE = f"@dave:{SERVER_NAME}"
ALICE = "@alice:remote.test"
GONE = "@gone:remote.test"
ROOM = "!r:remote.test"
NOBODY = ProfileValue(None, None)


def apply_all(db: Engine, settings: Settings) -> BatchOutcome:
    """Run the consumer until the inbox is empty; everything it asked to publish."""
    total = BatchOutcome()
    while True:
        applied = apply_accepted(db, settings, total.merge)
        if not applied.more:
            return total


def send(db: Engine, settings: Settings, *events: dict) -> BatchOutcome:
    accept_transaction(db, list(events))
    return apply_all(db, settings)


def counter(db: Engine) -> int | None:
    with db.connect() as conn:
        return room_store.member_events(conn, ROOM)


def queue(db: Engine, *items: SnapshotItem) -> None:
    with db.begin() as conn:
        accept_snapshots(conn, list(items))


def snapshot_item(
    db: Engine,
    joined: dict[str, ProfileValue],
    join_rule: str | None = "invite",
    history: str | None = "shared",
    purpose: str = BACKFILL,
    read_after: int | str | None = "now",
) -> SnapshotItem:
    return SnapshotItem(
        ROOM,
        purpose,
        counter(db) if read_after == "now" else read_after,  # type: ignore[arg-type]
        RoomSnapshot(joined, join_rule, history),
    )


def members(db: Engine) -> set[str]:
    with db.connect() as conn:
        return room_store.members_of(conn, {ROOM})


def room_row(db: Engine):
    with db.connect() as conn:
        return conn.execute(select(rooms).where(rooms.c.room_id == ROOM)).one()


def found(db: Engine, searcher: str, term: str) -> set[str]:
    with db.connect() as conn:
        return {hit.user_id for hit in search_directory(conn, searcher, term, 50).results}


def test_a_snapshot_adds_unknown_members_and_removes_departed_ones(
    db: Engine, settings: Settings
) -> None:
    send(db, settings, member(ROOM, GONE))
    outcome = send(db, settings, member(ROOM, BOB))
    assert outcome.rooms_to_backfill == {ROOM: BOB}
    queue(db, snapshot_item(db, {BOB: NOBODY, ALICE: ProfileValue("Delia", None)}, "public"))
    outcome = apply_all(db, settings)
    assert members(db) == {BOB, ALICE}
    assert entry_ids(db) == {BOB, ALICE}
    assert outcome.fetch_servers == {"remote.test": 1}
    row = room_row(db)
    assert row.backfill_as is None and row.is_public and row.checked_at_ms is not None
    assert row.recheck_due_ms > row.checked_at_ms
    # The per-room name is a trigger, never shown nor searchable.
    with db.connect() as conn:
        alice = conn.execute(select(user_directory).where(user_directory.c.user_id == ALICE)).one()
    assert alice.display_name is None
    assert found(db, DAVE, "delia") == set()


def test_a_snapshot_read_before_newer_events_is_refused_and_read_again(
    db: Engine, settings: Settings
) -> None:
    send(db, settings, member(ROOM, BOB))
    stale = snapshot_item(db, {BOB: NOBODY})
    # Eve joined after the snapshot was read; it would take her for gone.
    accept_transaction(db, [member(ROOM, EVE)])
    queue(db, stale)
    outcome = apply_all(db, settings)
    assert members(db) == {BOB, EVE}
    assert outcome.snapshots_to_retry == [(ROOM, BACKFILL, 1)]
    assert room_row(db).checked_at_ms is None


def test_events_after_a_snapshot_in_the_inbox_are_applied_after_it(
    db: Engine, settings: Settings
) -> None:
    send(db, settings, member(ROOM, BOB))
    queue(db, snapshot_item(db, {BOB: NOBODY, ALICE: NOBODY}, "public"))
    accept_transaction(db, [member(ROOM, ALICE, membership="leave")])
    apply_all(db, settings)
    assert members(db) == {BOB}
    assert entry_ids(db) == {BOB}


def test_two_snapshots_read_between_the_same_events_are_both_current(
    db: Engine, settings: Settings
) -> None:
    send(db, settings, member(ROOM, BOB))
    first = snapshot_item(db, {BOB: NOBODY, ALICE: NOBODY})
    second = snapshot_item(db, {BOB: NOBODY, ALICE: NOBODY, GONE: NOBODY})
    queue(db, first)
    outcome = apply_all(db, settings)
    queue(db, second)
    outcome.merge(apply_all(db, settings))
    assert outcome.snapshots_to_retry == []
    assert members(db) == {BOB, ALICE, GONE}


def test_a_snapshot_without_a_readable_join_rule_makes_the_room_not_public(
    db: Engine, settings: Settings
) -> None:
    send(db, settings, member(ROOM, BOB), join_rules(ROOM, "public"), member(ROOM, ALICE))
    assert found(db, DAVE, "alice") == {ALICE}
    queue(db, snapshot_item(db, {BOB: NOBODY, ALICE: NOBODY}, join_rule=None, history=None))
    apply_all(db, settings)
    row = room_row(db)
    assert row.join_rule is None and not row.is_public
    assert found(db, DAVE, "alice") == set()


def test_a_reconciliation_repairs_what_events_missed_and_counts_it(
    db: Engine, settings: Settings
) -> None:
    send(
        db,
        settings,
        member(ROOM, BOB),
        member(ROOM, GONE),
        join_rules(ROOM, "public"),
        history_visibility(ROOM, "shared"),
    )
    with db.connect() as conn:
        before = counters.read(conn, REPAIRS_PREFIX)
    queue(
        db,
        snapshot_item(db, {BOB: NOBODY, ALICE: NOBODY}, join_rule="invite", purpose=RECONCILE),
    )
    apply_all(db, settings)
    assert members(db) == {BOB, ALICE}
    assert not room_row(db).is_public
    with db.connect() as conn:
        after = counters.read(conn, REPAIRS_PREFIX)
    repairs = {name: after[name] - before.get(name, 0) for name in after}
    assert repairs == {
        REPAIRS_PREFIX + "members_added": 1,
        REPAIRS_PREFIX + "members_removed": 1,
        REPAIRS_PREFIX + "join_rule": 1,
    }
    # The same snapshot again finds nothing to repair.
    queue(db, snapshot_item(db, {BOB: NOBODY, ALICE: NOBODY}, "invite", purpose=RECONCILE))
    apply_all(db, settings)
    with db.connect() as conn:
        assert counters.read(conn, REPAIRS_PREFIX) == after


def test_local_members_found_gone_leave_and_the_room_is_forgotten(
    db: Engine, settings: Settings
) -> None:
    send(db, settings, member(ROOM, BOB), member(ROOM, ALICE), join_rules(ROOM, "public"))
    departed = SnapshotItem(ROOM, RECONCILE, counter(db), None, departed=(BOB,))
    queue(db, departed)
    apply_all(db, settings)
    assert entry_ids(db) == set()
    row = room_row(db)
    assert not row.is_visible and not row.is_public and row.join_rule is None


def test_a_replayed_snapshot_changes_nothing_and_queues_nothing(
    db: Engine, settings: Settings
) -> None:
    send(db, settings, member(ROOM, BOB))
    item = snapshot_item(db, {BOB: NOBODY, ALICE: ProfileValue("Alice", None)}, "public")
    queue(db, item)
    first = apply_all(db, settings)
    with db.connect() as conn:
        before = conn.execute(select(user_directory).order_by(user_directory.c.user_id)).all()
    queue(db, item)
    again = apply_all(db, settings)
    with db.connect() as conn:
        after = conn.execute(select(user_directory).order_by(user_directory.c.user_id)).all()
    assert first.fetch_servers and not again.fetch_servers
    assert after == before
