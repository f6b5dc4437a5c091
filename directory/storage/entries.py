"""SQL for directory entries (user_directory): existence, public profile, seen values."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    case,
    delete,
    exists,
    func,
    not_,
    select,
    update,
)

from directory.dedup import SeenState
from directory.events import ProfileValue, server_name_of
from directory.models import pending_fetches, room_members, rooms, user_directory
from directory.storage import pending
from directory.storage.common import (
    any_of,
    id_batches,
    is_postgresql,
    rows_as_arrays,
    update_rows,
    upsert_rows,
)
from directory.text import entry_keys

_in_visible_room = select(room_members.c.user_id).join(
    rooms, and_(rooms.c.room_id == room_members.c.room_id, rooms.c.is_visible)
)


def visible_users(conn: Connection, user_ids: Collection[str]) -> dict[str, bool]:
    """The users among these joined to at least one room we can see, each with whether
    one of those rooms is public or world-readable (the entry's in_public_room)."""
    in_public_room = func.max(case((rooms.c.is_public, 1), else_=0))
    found: dict[str, bool] = {}
    for batch in id_batches(conn, user_ids):
        rows = conn.execute(
            select(room_members.c.user_id, in_public_room)
            .join(rooms, and_(rooms.c.room_id == room_members.c.room_id, rooms.c.is_visible))
            .where(any_of(conn, room_members.c.user_id, batch))
            .group_by(room_members.c.user_id)
        )
        found.update((user_id, bool(public)) for user_id, public in rows)
    return found


def seen_states(conn: Connection, user_ids: Collection[str]) -> dict[str, SeenState]:
    """The dedup state of every existing entry among these users."""
    d = user_directory.c
    found: dict[str, SeenState] = {}
    for batch in id_batches(conn, user_ids):
        rows = conn.execute(select(d.user_id, *_SEEN_COLUMNS).where(any_of(conn, d.user_id, batch)))
        for user_id, *seen in rows:
            found[user_id] = _seen_state(*seen)
    return found


_SEEN_COLUMNS = (
    user_directory.c.seen_displayname,
    user_directory.c.seen_avatar_url,
    user_directory.c.seen_room_id,
    user_directory.c.seen_elsewhere,
    user_directory.c.seen_per_room,
    user_directory.c.seen_checks,
    user_directory.c.seen_checked_at_ms,
)


def _seen_state(
    name: str | None,
    avatar: str | None,
    room_id: str | None,
    elsewhere: bool,
    per_room: bool,
    checks: int | None,
    checked_at_ms: int | None,
) -> SeenState:
    value = None if room_id is None else ProfileValue(name, avatar)
    return SeenState(
        value, room_id, bool(elsewhere), bool(per_room), int(checks or 0), checked_at_ms
    )


# The columns create_placeholders fills; the profile columns (display_name, avatar_url,
# fetched_at_ms, name_key) stay NULL until a fetch lands.
_PLACEHOLDER_COLUMNS = (
    "user_id",
    "server_name",
    "refresh_due_ms",
    "in_public_room",
    "created_at_ms",
    "search_words",
    "localpart_key",
    "seen_displayname",
    "seen_avatar_url",
    "seen_room_id",
    "seen_elsewhere",
    "seen_per_room",
    "seen_checks",
    "seen_checked_at_ms",
    "fetched_generation",
    "listed",
    "unlisted_reason",
)


def _seen_columns(state: SeenState) -> dict[str, object]:
    value = state.value or ProfileValue(None, None)
    return {
        "seen_displayname": value.displayname,
        "seen_avatar_url": value.avatar_url,
        "seen_room_id": state.room_id,
        "seen_elsewhere": state.elsewhere,
        "seen_per_room": state.per_room,
        "seen_checks": state.checks,
        "seen_checked_at_ms": state.checked_at_ms,
    }


def create_placeholders(
    conn: Connection,
    states: dict[str, SeenState],
    now_ms: int,
    refresh_due_ms: int,
    in_public_room: Collection[str] = (),
    unlisted: Mapping[str, str] | None = None,
) -> None:
    """New entries showing nothing but the user id, until the public profile is fetched.
    `in_public_room`: those of these users who share a public room; `unlisted`: those
    the configuration keeps out of search results, with why (directory/listing.py).

    Each entry starts at a fresh generation: a fetch claimed before it existed (for an
    earlier entry of the same user, who left and came back) answers an older
    generation, and so cannot write to it or count against it."""
    users = sorted(states)
    unlisted = unlisted or {}
    floors = dict(zip(users, pending.allocate_generations(conn, len(users)), strict=True))
    rows = []
    for user_id in users:
        keys = entry_keys(user_id, None)
        row = {
            "user_id": user_id,
            "server_name": server_name_of(user_id),
            "refresh_due_ms": refresh_due_ms,
            "in_public_room": user_id in in_public_room,
            "created_at_ms": now_ms,
            "search_words": keys["search_words"],
            "localpart_key": keys["localpart_key"],
            "fetched_generation": floors[user_id],
            "listed": user_id not in unlisted,
            "unlisted_reason": unlisted.get(user_id),
            **_seen_columns(states[user_id]),
        }
        rows.append(tuple(row[name] for name in _PLACEHOLDER_COLUMNS))
    # A concurrent writer (a backfill of another room) may have created the entry first;
    # then its entry stands, and our queued fetch still runs.
    upsert_rows(conn, user_directory, _PLACEHOLDER_COLUMNS, rows, conflict=("user_id",))


def _update_entries(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """UPDATE each row's entry ("uid") with the row's other columns (the same in all)."""
    if rows:
        names = [name for name in rows[0] if name != "uid"]
        update_rows(
            conn,
            user_directory,
            "user_id",
            names,
            [(row["uid"], *(row[name] for name in names)) for row in rows],
        )


def save_seen(conn: Connection, states: dict[str, SeenState]) -> None:
    rows = [{"uid": user_id, **_seen_columns(state)} for user_id, state in states.items()]
    _update_entries(conn, rows)


def delete_entries(conn: Connection, user_ids: Collection[str]) -> int:
    deleted = 0
    for batch in id_batches(conn, user_ids):
        # Explicit, not only by the foreign key's cascade: the pending row must go even
        # where foreign keys are not enforced.
        conn.execute(delete(pending_fetches).where(any_of(conn, pending_fetches.c.user_id, batch)))
        deleted += conn.execute(
            delete(user_directory).where(any_of(conn, user_directory.c.user_id, batch))
        ).rowcount
    return deleted


def set_public_flags(conn: Connection, flags: dict[str, bool]) -> None:
    """Set in_public_room of these entries. Only the entries whose flag changes are
    written: the flag is in two indexes, so every rewritten row also costs index
    entries, and most batches change few."""
    if not flags:
        return
    d = user_directory.c
    if is_postgresql(conn):
        values = rows_as_arrays(
            user_directory, ("user_id", "in_public_room"), sorted(flags.items())
        ).subquery()
        conn.execute(
            update(user_directory)
            .where(d.user_id == values.c.user_id, d.in_public_room != values.c.in_public_room)
            .values(in_public_room=values.c.in_public_room)
        )
        return
    for flag in (True, False):
        users = [user_id for user_id, public in flags.items() if public == flag]
        for batch in id_batches(conn, users):
            conn.execute(
                update(user_directory)
                .where(any_of(conn, d.user_id, batch), d.in_public_room != flag)
                .values(in_public_room=flag)
            )


@dataclass(frozen=True)
class AnswerTarget:
    """What an answer needs to know of the entry it would update."""

    seen: SeenState
    # Answers of this generation or older are not applied (see create_placeholders).
    fetched_generation: int | None
    # What earlier fetches learnt for the listing (kept when an answer says nothing new).
    profile_visibility: str | None = None
    account_status: str | None = None


def answer_targets(conn: Connection, user_ids: Collection[str]) -> dict[str, AnswerTarget]:
    """The existing entries among these users, locked (FOR UPDATE on PostgreSQL;
    SQLite's write transaction excludes other writers) so that none found here is
    deleted or recreated before the caller commits."""
    d = user_directory.c
    found: dict[str, AnswerTarget] = {}
    for batch in id_batches(conn, user_ids):
        query = select(
            d.user_id, d.fetched_generation, d.profile_visibility, d.account_status, *_SEEN_COLUMNS
        ).where(any_of(conn, d.user_id, batch))
        # One order for every locker, so two committers cannot wait on each other.
        rows = conn.execute(query.order_by(d.user_id).with_for_update())
        for user_id, generation, visibility, account, *seen in rows:
            found[user_id] = AnswerTarget(_seen_state(*seen), generation, visibility, account)
    return found


def apply_profiles(
    conn: Connection,
    profiles: dict[str, tuple[ProfileValue, int]],
    now_ms: int,
    refresh_due_ms: dict[str, int],
    listing: Mapping[str, Listing] | None = None,
) -> None:
    """Store fetched public profiles, each with the generation it answers, in one
    statement for all of them; with `listing`, each entry's listing too (one for
    every profile).

    The WHERE on user_id is the race guard: an answer for a user who left every visible
    room touches no row and so cannot bring the entry back. Callers lock the entries
    first (answer_targets) and only pass answers newer than what each entry shows.
    """
    rows = [
        {
            "uid": user_id,
            "display_name": profile.displayname,
            "avatar_url": profile.avatar_url,
            "fetched_at_ms": now_ms,
            "fetched_generation": generation,
            "refresh_due_ms": refresh_due_ms[user_id],
            **entry_keys(user_id, profile.displayname),
            **(listing[user_id].columns() if listing is not None else {}),
        }
        for user_id, (profile, generation) in sorted(profiles.items())
    ]
    _update_entries(conn, rows)


@dataclass(frozen=True)
class Listing:
    """Whether search may return an entry, why not, and the facts fetches brought
    that decide it (directory/listing.py)."""

    listed: bool
    unlisted_reason: str | None
    profile_visibility: str | None
    account_status: str | None

    def columns(self) -> dict[str, object]:
        return {
            "listed": self.listed,
            "unlisted_reason": self.unlisted_reason,
            "profile_visibility": self.profile_visibility,
            "account_status": self.account_status,
        }


@dataclass(frozen=True)
class ListingRow:
    user_id: str
    listed: bool
    unlisted_reason: str | None
    profile_visibility: str | None
    account_status: str | None


def listing_rows(conn: Connection, after: str | None, limit: int) -> list[ListingRow]:
    """The next `limit` entries after user id `after`, in user id order, locked (FOR
    UPDATE on PostgreSQL, in the same order as answer_targets; SQLite's write
    transaction excludes other writers) so a fetch landing meanwhile is not undone."""
    d = user_directory.c
    query = select(d.user_id, d.listed, d.unlisted_reason, d.profile_visibility, d.account_status)
    if after is not None:
        query = query.where(d.user_id > after)
    rows = conn.execute(query.order_by(d.user_id).limit(limit).with_for_update())
    return [
        ListingRow(user_id, bool(listed), reason, visibility, account)
        for user_id, listed, reason, visibility, account in rows
    ]


def set_listing(conn: Connection, reasons: Mapping[str, str | None]) -> None:
    """Set each entry's listing: unlisted with the reason given, listed for None."""
    update_rows(
        conn,
        user_directory,
        "user_id",
        ("listed", "unlisted_reason"),
        [(user_id, reason is None, reason) for user_id, reason in sorted(reasons.items())],
    )


def due_for_refresh(conn: Connection, now_ms: int, limit: int) -> list[str]:
    """Entries whose profile is older than the maximum age, oldest first, not already queued."""
    d, p = user_directory.c, pending_fetches.c
    already_queued = exists().where(p.user_id == d.user_id, p.next_attempt_ms.is_not(None))
    return list(
        conn.scalars(
            select(d.user_id)
            .where(d.refresh_due_ms <= now_ms, not_(already_queued))
            .order_by(d.refresh_due_ms)
            .limit(limit)
        )
    )


def postpone_refresh(conn: Connection, due: Iterable[tuple[str, int]]) -> None:
    update_rows(conn, user_directory, "user_id", ("refresh_due_ms",), list(due))


def delete_orphans(conn: Connection) -> int:
    """Remove entries of users in no visible room: a repair; the hooks normally do it."""
    orphaned = select(user_directory.c.user_id).where(
        not_(exists(_in_visible_room.where(room_members.c.user_id == user_directory.c.user_id)))
    )
    return delete_entries(conn, list(conn.scalars(orphaned)))


@dataclass(frozen=True)
class PublicEntry:
    """What an entry shows, and nothing it only remembers: display_name and avatar_url
    are the fetched public profile (None on a placeholder); the seen_* columns, which
    may hold a per-room value, are never read here."""

    user_id: str
    display_name: str | None
    avatar_url: str | None
    fetched_at_ms: int | None
    fetched_generation: int | None
    in_public_room: bool
    created_at_ms: int
    refresh_due_ms: int
    # Search returns only listed entries; unlisted_reason says why not
    # (directory/listing.py), profile_visibility and account_status what fetches said.
    listed: bool = True
    unlisted_reason: str | None = None
    profile_visibility: str | None = None
    account_status: str | None = None

    @property
    def is_placeholder(self) -> bool:
        return self.fetched_at_ms is None


def public_entry(conn: Connection, user_id: str) -> PublicEntry | None:
    d = user_directory.c
    row = conn.execute(
        select(
            d.user_id,
            d.display_name,
            d.avatar_url,
            d.fetched_at_ms,
            d.fetched_generation,
            d.in_public_room,
            d.created_at_ms,
            d.refresh_due_ms,
            d.listed,
            d.unlisted_reason,
            d.profile_visibility,
            d.account_status,
        ).where(d.user_id == user_id)
    ).one_or_none()
    if row is None:
        return None
    entry = PublicEntry(*row)
    entry = replace(entry, in_public_room=bool(entry.in_public_room), listed=bool(entry.listed))
    if entry.is_placeholder:
        # Only a fetch writes these; a placeholder shows the user id alone.
        entry = replace(entry, display_name=None, avatar_url=None)
    return entry


def lock_entry(conn: Connection, user_id: str) -> bool:
    """Whether the user has an entry, held (FOR UPDATE on PostgreSQL; SQLite's write
    transaction excludes other writers) so it is not deleted before the caller commits."""
    d = user_directory.c
    found = conn.execute(select(d.user_id).where(d.user_id == user_id).with_for_update()).first()
    return found is not None


def count(conn: Connection) -> int:
    return int(conn.scalar(select(func.count()).select_from(user_directory)) or 0)
