"""Bulk loading straight into the service's schema, for states that events would take
too long to build: a backlog of pending fetches, a directory of a million entries.

Rows are what the hooks would have written: derived search columns come from
directory.text.entry_keys, in_public_room from the rooms each user is in, and rooms
are visible (as if a local user were joined).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import psycopg

from bench.population import (
    FIRST_NAMES,
    LAST_NAMES,
    LOCAL_SERVER,
    Population,
    localpart_for,
    public_profile,
)
from directory.text import entry_keys

DAY_MS = 24 * 3600 * 1000
ENTRY_COLUMNS = (
    "user_id, server_name, display_name, avatar_url, fetched_at_ms, refresh_due_ms, in_public_room,"
    " search_words, localpart_key, name_key, seen_displayname, seen_avatar_url, seen_room_id,"
    " seen_elsewhere, seen_per_room, created_at_ms"
)


def now_ms() -> int:
    return int(time.time() * 1000)


def load_backlog(conn: psycopg.Connection, users: Sequence[str], users_per_room: int = 100) -> int:
    """Every user a placeholder entry in a visible private room, with a fetch due now:
    the state a burst of first-sight joins (or a restart with a backlog) leaves.
    Runs in the caller's transaction; returns the time (ms) the fetches were queued."""
    now = now_ms()
    rooms = [
        f"!backlog{i:05d}:{LOCAL_SERVER}"
        for i in range((len(users) + users_per_room - 1) // users_per_room)
    ]
    with conn.cursor() as cur:
        with cur.copy(
            "COPY rooms (room_id, join_rule, history_visibility, is_public, is_visible) FROM STDIN"
        ) as copy:
            for room in rooms:
                copy.write_row((room, "invite", "shared", False, True))
        with cur.copy(
            "COPY room_members (room_id, user_id, is_local, displayname, avatar_url) FROM STDIN"
        ) as copy:
            for i, room in enumerate(rooms):
                copy.write_row((room, f"@local{i % 50:04d}:{LOCAL_SERVER}", True, None, None))
            for i, user in enumerate(users):
                p = public_profile(user)
                copy.write_row(
                    (rooms[i // users_per_room], user, False, p["displayname"], p["avatar_url"])
                )
        with cur.copy(f"COPY user_directory ({ENTRY_COLUMNS}) FROM STDIN") as copy:
            for i, user in enumerate(users):
                p = public_profile(user)
                keys = entry_keys(user, None)
                copy.write_row(
                    (
                        user,
                        user.partition(":")[2],
                        None,
                        None,
                        None,
                        now + DAY_MS,
                        False,
                        keys["search_words"],
                        keys["localpart_key"],
                        keys["name_key"],
                        p["displayname"],
                        p["avatar_url"],
                        rooms[i // users_per_room],
                        False,
                        False,
                        now,
                    )
                )
        with cur.copy(
            "COPY pending_fetches (user_id, server_name, generation, attempts,"
            " next_attempt_ms, reason, queued_at_ms) FROM STDIN"
        ) as copy:
            for user in users:
                copy.write_row((user, user.partition(":")[2], 1, 0, now, "event", now))
    return now


def requeue_all(conn: psycopg.Connection) -> int:
    """Queue a fetch of every entry again (what a refresh of all profiles does)."""
    now = now_ms()
    conn.execute(
        "INSERT INTO pending_fetches (user_id, server_name, generation, attempts, next_attempt_ms,"
        " reason, queued_at_ms)"
        " SELECT user_id, server_name, 1, 0, %s, 'refresh', %s FROM user_directory"
        " ON CONFLICT (user_id) DO UPDATE SET generation = pending_fetches.generation + 1,"
        " next_attempt_ms = excluded.next_attempt_ms",
        (now, now),
    )
    return now


def converged(
    conn: psycopg.Connection, population: Population, version: int = 0
) -> tuple[int, int]:
    """(entries holding exactly their public profile, entries that do not)."""
    good = bad = 0
    for user_id, name, avatar in conn.execute(
        "SELECT user_id, display_name, avatar_url FROM user_directory"
    ):
        p = public_profile(user_id, version)
        if name == p["displayname"] and avatar == p["avatar_url"]:
            good += 1
        else:
            bad += 1
    return good, bad


# --- the search directory -------------------------------------------------------------

USERS_PER_ROOM = 50
PUBLIC_ROOM_SHARE = 0.4
SEARCHERS = 20
SEARCHER_PRIVATE_ROOMS = 5


def search_room(index: int) -> str:
    return f"!s{index:06d}:{LOCAL_SERVER}"


def room_is_public(index: int) -> bool:
    return random.Random(index * 7919).random() < PUBLIC_ROOM_SHARE


def searcher(k: int) -> str:
    return f"@searcher{k:02d}:{LOCAL_SERVER}"


def _server(rng: random.Random) -> str:
    # One big public server, a long tail of small ones.
    if rng.random() < 0.3:
        return "matrix.org"
    return f"hs{int(2000 * rng.random() ** 3)}.example"


def _display_name(rng: random.Random) -> str | None:
    roll = rng.random()
    first, last = (
        FIRST_NAMES[rng.randrange(len(FIRST_NAMES))],
        LAST_NAMES[rng.randrange(len(LAST_NAMES))],
    )
    if roll < 0.70:
        return f"{first} {last}"
    if roll < 0.80:
        return f"{first}{rng.randrange(100)}"
    if roll < 0.85:
        return f"{first} {last[0]}. ({rng.choice(['she/her', 'he/him', 'they/them', 'away'])})"
    return None  # a placeholder: the profile had no name, or was never fetched


def load_search_entries(conn: psycopg.Connection, start: int, end: int) -> list[str]:
    """Entries start..end-1 and their memberships: every user in one room of 50 (40% of
    rooms public), 30% in a second room too. The first call also creates the
    searchers: local users in 5 private rooms and one public room each.

    Returns sample user ids (for search terms)."""
    rng = random.Random(start * 31 + 1)
    now = now_ms()
    samples: list[str] = []
    first_room, last_room = start // USERS_PER_ROOM, (end - 1) // USERS_PER_ROOM
    with conn.cursor() as cur:
        with cur.copy(
            "COPY rooms (room_id, join_rule, history_visibility, is_public, is_visible) FROM STDIN"
        ) as copy:
            for index in range(
                first_room if start % USERS_PER_ROOM == 0 else first_room + 1, last_room + 1
            ):
                public = room_is_public(index)
                copy.write_row(
                    (search_room(index), "public" if public else "invite", "shared", public, True)
                )
        with (
            cur.copy(f"COPY user_directory ({ENTRY_COLUMNS}) FROM STDIN") as entries,
        ):
            members: list[tuple[str, str, bool, str | None, str | None]] = []
            for i in range(start, end):
                user = f"@{localpart_for(i, rng)}:{_server(rng)}"
                name = _display_name(rng)
                avatar = f"mxc://{user.partition(':')[2]}/{i:x}" if rng.random() < 0.6 else None
                rooms = [i // USERS_PER_ROOM]
                if rng.random() < 0.3:
                    rooms.append(rng.randrange(0, i // USERS_PER_ROOM + 1))
                    rooms = sorted(set(rooms))
                public = any(room_is_public(r) for r in rooms)
                keys = entry_keys(user, name)
                entries.write_row(
                    (
                        user,
                        user.partition(":")[2],
                        name,
                        avatar,
                        now,
                        now + DAY_MS,
                        public,
                        keys["search_words"],
                        keys["localpart_key"],
                        keys["name_key"],
                        name,
                        avatar,
                        search_room(rooms[0]),
                        False,
                        False,
                        now,
                    )
                )
                members.extend((search_room(r), user, False, name, avatar) for r in rooms)
                if rng.random() < 0.002:
                    samples.append(user)
        if start == 0:
            # Searchers live among the first level's rooms, so every level sees them.
            pick = random.Random(5)
            private = [r for r in range(last_room + 1) if not room_is_public(r)]
            public_rooms = [r for r in range(last_room + 1) if room_is_public(r)]
            for k in range(SEARCHERS):
                rooms = pick.sample(private, min(SEARCHER_PRIVATE_ROOMS, len(private)))
                rooms += pick.sample(public_rooms, min(1, len(public_rooms)))
                members.extend((search_room(r), searcher(k), True, None, None) for r in rooms)
        with cur.copy(
            "COPY room_members (room_id, user_id, is_local, displayname, avatar_url) FROM STDIN"
        ) as copy:
            for row in members:
                copy.write_row(row)
    return samples


def secondary_indexes(conn: psycopg.Connection, tables: Sequence[str]) -> list[tuple[str, str]]:
    """(name, definition) of every index but the primary keys, as the migrations made them."""
    return list(
        conn.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i"
            " JOIN pg_class c ON c.relname = i.indexname JOIN pg_index x ON x.indexrelid = c.oid"
            " WHERE i.tablename = ANY(%s) AND NOT x.indisprimary",
            (list(tables),),
        )
    )
