"""`python -m directory explain USER_ID`: why a user is or is not listed and who can find
them; never a per-room name or avatar, even where the database holds one."""

from __future__ import annotations

from sqlalchemy import Engine, select

from directory.clock import now_ms
from directory.config import Settings
from directory.models import room_members, user_directory
from directory.storage import destinations
from tests.cli.conftest import (
    ALICE,
    BOB,
    CAROL,
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
SECRET = "Alice in Wonderland Club"  # Alice's name in the private room only
SECRET_AVATAR = "mxc://remote.test/club-hat"
CAROLS_ROOM_NAME = "Carol (on call)"


def make_state(db: Engine, settings: Settings) -> None:
    apply(
        db,
        settings,
        [
            join_rules(PUBLIC, "public"),
            member(PUBLIC, BOB),
            member(PUBLIC, ALICE, displayname="Alice"),
            join_rules(PRIVATE, "invite"),
            member(PRIVATE, BOB),
            member(PRIVATE, ALICE, displayname=SECRET, avatar_url=SECRET_AVATAR),
            member(PRIVATE, CAROL, displayname=CAROLS_ROOM_NAME),
            member(DARK, ALICE, displayname=SECRET),
            member(DARK, FRANK, displayname="Frank's alias"),
        ],
    )
    fetched(db, settings, ALICE, "Alice", "mxc://remote.test/alice")


def test_explain_shows_the_public_profile_and_who_finds_them_never_a_per_room_value(
    db: Engine, cli_settings: Settings
) -> None:
    make_state(db, cli_settings)
    # The database does hold the per-room values: in the member rows, and in the
    # entry's dedup state.
    with db.connect() as conn:
        held = set(
            conn.scalars(select(room_members.c.displayname).where(room_members.c.user_id == ALICE))
        )
        seen = conn.scalar(
            select(user_directory.c.seen_displayname).where(user_directory.c.user_id == ALICE)
        )
    assert SECRET in held and seen == SECRET

    done = run_cli(cli_settings, "explain", ALICE)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout and "Wonderland" not in done.stdout
    assert SECRET_AVATAR not in done.stdout and "club-hat" not in done.stdout
    lines = done.stdout.splitlines()
    assert lines[0] == f"{ALICE} (remote user)"
    assert lines[1].startswith("  listed        yes, with their public profile (fetched ")
    assert lines[2] == "  display name  Alice"
    assert lines[3] == "  avatar        mxc://remote.test/alice"
    assert lines[4] == "  rooms         3 (2 visible)"
    assert lines[5].split() == [DARK, "private", "not", "visible", "(no", "local", "member)"]
    assert lines[6].split() == [PRIVATE, "private", "visible"]
    assert lines[7].split() == [PUBLIC, "public", "visible"]
    assert lines[8] == (
        f"  strangers     can find them: in a public or world-readable room we can see ({PUBLIC})"
    )
    assert lines[9] == "  room mates    members of their 2 visible rooms can find them"
    assert lines[10].startswith("  last fetch    ") and "(generation " in lines[10]
    assert lines[11] == "  pending       none"
    assert lines[12] == "  destination   remote.test: healthy"


def test_a_placeholder_shows_no_name_and_says_why_it_is_not_fetched(
    db: Engine, cli_settings: Settings
) -> None:
    make_state(db, cli_settings)
    taken = claim(db, "remote.test")
    fail(db, taken[CAROL], None, attempts=3)
    now = now_ms()
    with db.begin() as conn:
        for _ in range(3):
            destinations.record_failure(
                conn, "remote.test", now, "connection refused", lambda n: now + HOUR_MS
            )

    done = run_cli(cli_settings, "explain", CAROL)
    assert done.returncode == 0, done.stderr
    assert "on call" not in done.stdout and "display name" not in done.stdout
    lines = done.stdout.splitlines()
    assert lines[1] == (
        "  listed        yes, as a placeholder (the user id only, until their public profile"
        " is fetched)"
    )
    assert lines[2] == "  rooms         1 (1 visible)"
    assert lines[4] == (
        "  strangers     cannot find them: none of their rooms we can see is public or"
        " world-readable"
    )
    assert lines[5] == "  room mates    members of their 1 visible room can find them"
    assert lines[6] == "  last fetch    never (a placeholder)"
    assert lines[7].startswith(
        "  pending       given up after 3 failed attempts (until the next trigger, a refresh"
        " or a requeue); queued "
    )
    generation = taken[CAROL].generation
    assert lines[7].endswith(
        f"(event, generation {generation}); last error: HTTP 502 from the remote server"
    )
    assert lines[8].startswith("  destination   remote.test: backed off for 0:59:")
    assert "after 3 failures in a row; last error: connection refused" in lines[8]


def test_a_user_in_no_visible_room_is_not_listed_and_an_unknown_one_is_an_error(
    db: Engine, cli_settings: Settings
) -> None:
    make_state(db, cli_settings)
    done = run_cli(cli_settings, "explain", FRANK)
    assert done.returncode == 0, done.stderr
    assert "alias" not in done.stdout
    lines = done.stdout.splitlines()
    assert lines[1] == (
        "  listed        no: none of their 1 room is one we can see (no local member in it)"
    )
    assert "  strangers     cannot find them (not listed)" in lines
    assert "  pending       none" in lines

    unknown = run_cli(cli_settings, "explain", "@nobody:remote.test")
    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert unknown.stderr == (
        "python -m directory explain: @nobody:remote.test is unknown: no entry, no pending"
        " fetch, in no room we know\n"
    )

    malformed = run_cli(cli_settings, "explain", "alice")
    assert malformed.returncode == 2
    assert malformed.stdout == ""
    assert malformed.stderr == (
        "python -m directory explain: not a valid user id: 'alice' (expected @localpart:server)\n"
    )
