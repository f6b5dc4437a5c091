"""The membership hooks on a real database: entries exist exactly for users in a
visible room, event values never reach them, batches are set-based and replayable,
and who can find whom follows room membership and publicity (docs/design.md §2; scenarios 2,
8 and 10 at the hook level)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from directory.clock import now_ms
from directory.membership import BatchOutcome, process_events
from directory.models import metadata, pending_fetches, room_members, rooms, user_directory
from directory.search import search_directory
from tests.conftest import SERVER_NAME
from tests.support.events import history_visibility, join_rules, member

ALICE = "@alice:remote.test"
CAROL = "@carol:other.test"
BOB = f"@bob:{SERVER_NAME}"
DAVE = f"@dave:{SERVER_NAME}"
EVE = f"@eve:{SERVER_NAME}"


def process(engine: Engine, events: list[Any]) -> BatchOutcome:
    with engine.begin() as conn:
        return process_events(
            conn, events, server_name=SERVER_NAME, now_ms=now_ms(), profile_max_age_seconds=3600
        )


def entries(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(user_directory)).all()
    return {row.user_id: row._asdict() for row in rows}


def pending(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(pending_fetches)).all()
    return {row.user_id: row._asdict() for row in rows}


def found(engine: Engine, searcher: str, term: str) -> set[str]:
    with engine.connect() as conn:
        return {hit.user_id for hit in search_directory(conn, searcher, term, 50).results}


def snapshot(engine: Engine) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        return {
            table.name: sorted(
                # Not state: a random jitter, and a counter of batches seen.
                tuple(
                    v
                    for k, v in row._asdict().items()
                    if k not in ("refresh_due_ms", "member_events")
                )
                for row in conn.execute(select(table))
            )
            for table in metadata.sorted_tables
        }


def test_first_sight_creates_a_placeholder_and_queues_one_fetch(db: Engine) -> None:
    outcome = process(db, [member("!r:x", BOB), member("!r:x", ALICE, displayname="Delia")])
    assert outcome.created == 2 and outcome.fetch_servers == {"remote.test": 1, SERVER_NAME: 1}
    alice = entries(db)[ALICE]
    assert alice["display_name"] is None and alice["avatar_url"] is None
    assert "delia" not in alice["search_words"]
    assert pending(db)[ALICE]["next_attempt_ms"] is not None


def test_event_values_never_reach_the_directory_even_in_public_rooms(db: Engine) -> None:
    process(
        db,
        [
            join_rules("!pub:x", "public"),
            member("!pub:x", BOB, displayname="Bobby"),
            member("!pub:x", ALICE, displayname="Pubby", avatar_url="mxc://x/pubby"),
        ],
    )
    process(db, [member("!pub:x", ALICE, displayname="Pubby2", avatar_url="mxc://x/p2")])
    for row in entries(db).values():
        assert row["display_name"] is None and row["avatar_url"] is None
    assert found(db, EVE, "pubby") == set()
    assert found(db, EVE, "bobby") == set()
    assert found(db, EVE, "alice") == {ALICE}


def test_replaying_a_batch_changes_nothing(db: Engine) -> None:
    batch = [
        join_rules("!pub:x", "public"),
        member("!pub:x", BOB),
        member("!pub:x", ALICE, displayname="Alice"),
        member("!priv:x", BOB),
        member("!priv:x", ALICE, displayname="Delia"),
        member("!priv:x", CAROL, displayname="Carol"),
        member("!priv:x", CAROL, membership="leave"),
        history_visibility("!priv:x", "shared"),
    ]
    first = process(db, batch)
    before = snapshot(db)
    again = process(db, batch)
    assert snapshot(db) == before
    assert first.fetch_servers and not again.fetch_servers
    assert again.created == again.deleted == 0


def test_one_bad_event_does_not_drop_the_others(db: Engine) -> None:
    outcome = process(
        db,
        [
            member("!r:x", BOB),
            {"type": "m.room.member", "room_id": "!r:x", "state_key": "nobody", "content": {}},
            {"type": "m.room.member", "room_id": "!r:x", "state_key": ALICE, "content": []},
            {"type": "m.room.member", "room_id": 5, "state_key": ALICE, "content": {}},
            member("!r:x", CAROL, membership="dance"),
            "not an event",
            member("!r:x", ALICE),
            {"type": "m.room.message", "room_id": "!r:x", "content": {"body": "hi"}},
            # A NUL or a lone surrogate cannot even be stored (PostgreSQL, UTF-8).
            member("!r:x", "@nul\x00:remote.test"),
            member("!r:x", "@lone\ud800:remote.test"),
            member("!r:x", "@tab\t:remote.test"),
            member("!r\x00:x", CAROL),
            member("!r\udc00:x", CAROL),
        ],
    )
    assert outcome.invalid == 10
    assert set(entries(db)) == {BOB, ALICE}


@pytest.mark.parametrize(
    "content",
    [{"join_rule": "pub\x00lic"}, {"join_rule": 5}, {}, {"join_rule": "x" * 100}, "public"],
    ids=["control-character", "not-a-string", "missing", "too-long", "not-an-object"],
)
def test_a_malformed_join_rule_makes_the_room_not_public(db: Engine, content: object) -> None:
    # Fail closed: a rule we cannot read is no rule that lets strangers find members.
    process(db, [member("!r:x", BOB), join_rules("!r:x", "public"), member("!r:x", ALICE)])
    assert found(db, DAVE, "alice") == {ALICE}
    broken = join_rules("!r:x", "public") | {"content": content}
    outcome = process(db, [broken])
    assert outcome.invalid == 0
    with db.connect() as conn:
        room = conn.execute(select(rooms).where(rooms.c.room_id == "!r:x")).one()
    assert room.join_rule is None and not room.is_public
    assert found(db, DAVE, "alice") == set()


def test_our_server_leaving_forgets_whether_the_room_was_public(db: Engine) -> None:
    process(db, [member("!r:x", BOB), join_rules("!r:x", "public"), member("!r:x", ALICE)])
    process(db, [member("!r:x", BOB, membership="leave")])
    with db.connect() as conn:
        room = conn.execute(select(rooms).where(rooms.c.room_id == "!r:x")).one()
    assert room.join_rule is None and room.history_visibility is None and not room.is_public
    # Back in: members and publicity are unknown until the room is read again.
    outcome = process(db, [member("!r:x", EVE)])
    assert outcome.rooms_to_backfill == {"!r:x": EVE}
    assert found(db, DAVE, "eve") == set()


def test_leaving_the_last_visible_room_removes_the_entry_and_its_pending_fetch(db: Engine) -> None:
    process(
        db,
        [member("!a:x", BOB), member("!b:x", BOB), member("!a:x", ALICE), member("!b:x", ALICE)],
    )
    process(db, [member("!a:x", ALICE, membership="leave")])
    assert ALICE in entries(db)
    outcome = process(db, [member("!b:x", ALICE, membership="ban")])
    assert ALICE not in entries(db) and ALICE not in pending(db)
    assert outcome.deleted == 1


def test_our_server_leaving_a_room_rechecks_its_members(db: Engine) -> None:
    """Scenario 8."""
    process(
        db,
        [
            member("!r1:x", BOB),
            member("!r1:x", ALICE),
            member("!r1:x", CAROL),
            member("!r2:x", DAVE),
            member("!r2:x", CAROL),
        ],
    )
    process(db, [member("!r1:x", BOB, membership="leave")])
    remaining = entries(db)
    assert ALICE not in remaining  # only in the room we left
    assert CAROL in remaining and DAVE in remaining  # still in a visible room
    assert BOB not in remaining  # our user is in no room now
    with db.connect() as conn:
        left = conn.execute(select(room_members).where(room_members.c.room_id == "!r1:x")).all()
        visible = conn.scalar(select(rooms.c.is_visible).where(rooms.c.room_id == "!r1:x"))
    assert left == [] and not visible


def test_a_room_becoming_visible_reveals_its_known_members_and_asks_for_a_backfill(
    db: Engine,
) -> None:
    process(db, [member("!r:x", ALICE)])  # no local member yet: not visible
    assert entries(db) == {}
    outcome = process(db, [member("!r:x", BOB)])
    assert set(entries(db)) == {ALICE, BOB}
    assert outcome.rooms_to_backfill == {"!r:x": BOB}


def test_local_users_go_through_the_same_path(db: Engine) -> None:
    process(db, [member("!r:x", BOB, displayname="Per-room Bob")])
    bob = entries(db)[BOB]
    assert bob["display_name"] is None and bob["seen_displayname"] == "Per-room Bob"
    assert pending(db)[BOB]["server_name"] == SERVER_NAME


def test_private_room_members_are_found_only_by_those_sharing_a_room(db: Engine) -> None:
    """Scenario 10: visibility follows membership and publicity, both ways."""
    process(db, [member("!priv:x", BOB), member("!priv:x", ALICE), member("!other:x", EVE)])
    assert found(db, BOB, "alice") == {ALICE}
    assert found(db, EVE, "alice") == set()

    process(db, [join_rules("!priv:x", "public")])
    assert found(db, EVE, "alice") == {ALICE}
    process(db, [join_rules("!priv:x", "invite")])
    assert found(db, EVE, "alice") == set()
    process(db, [history_visibility("!priv:x", "world_readable")])
    assert found(db, EVE, "alice") == {ALICE}
    process(db, [history_visibility("!priv:x", "shared")])
    assert found(db, EVE, "alice") == set()
    process(db, [member("!priv:x", EVE)])
    assert found(db, EVE, "alice") == {ALICE}
    process(db, [member("!priv:x", EVE, membership="leave")])
    assert found(db, EVE, "alice") == set()


@pytest.mark.parametrize("size", [100, 1000])
def test_a_batch_costs_the_same_statements_whatever_its_size(db: Engine, size: int) -> None:
    """Set-based: the number of SQL statements does not grow with the batch."""
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    process(db, [member("!seed:x", BOB)])
    batch = [member(f"!room{i % 50}:x", f"@user{i}:remote{i % 7}.test") for i in range(size)]
    batch += [member(f"!room{i}:x", BOB) for i in range(50)]
    event.listen(db, "before_cursor_execute", count)
    try:
        process(db, batch)
    finally:
        event.remove(db, "before_cursor_execute", count)
    assert len(entries(db)) == size + 1
    # ~20 statements per batch (executemany counts once); 1000 events would be 1000+.
    assert len(statements) < 40, len(statements)


def test_two_writers_creating_the_same_entry_both_commit(db: Engine) -> None:
    """Two batches (say, backfills of two rooms) that both see a user for the first
    time: the second waits for the first and keeps its entry instead of failing."""
    process(db, [member("!a:x", BOB), member("!b:x", EVE)])
    errors: list[BaseException] = []
    with db.connect() as first:
        first.begin()
        process_events(
            first,
            [member("!a:x", ALICE)],
            server_name=SERVER_NAME,
            now_ms=now_ms(),
            profile_max_age_seconds=3600,
        )

        def second() -> None:
            try:
                process(db, [member("!b:x", ALICE)])
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)  # it now waits on the first transaction's row
        first.commit()
    thread.join(10)
    assert errors == []
    assert ALICE in entries(db)
    with db.connect() as conn:
        rooms_of_alice = set(
            conn.scalars(select(room_members.c.room_id).where(room_members.c.user_id == ALICE))
        )
    assert rooms_of_alice == {"!a:x", "!b:x"}
