"""SQL for rooms and their joined members."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy import (
    Connection,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
    update,
)

from directory.events import ProfileValue
from directory.models import room_members, rooms
from directory.storage.common import (
    any_of,
    chunks,
    delete_rows,
    id_batches,
    is_postgresql,
    rows_as_arrays,
    update_rows,
    upsert_rows,
)


@dataclass(frozen=True)
class RoomFlags:
    is_visible: bool
    is_public: bool


def ensure_rooms(conn: Connection, room_ids: Collection[str]) -> None:
    upsert_rows(conn, rooms, ("room_id",), [(r,) for r in sorted(room_ids)], conflict=("room_id",))


def flags(conn: Connection, room_ids: Collection[str]) -> dict[str, RoomFlags]:
    found: dict[str, RoomFlags] = {}
    for batch in id_batches(conn, room_ids):
        rows = conn.execute(
            select(rooms.c.room_id, rooms.c.is_visible, rooms.c.is_public).where(
                any_of(conn, rooms.c.room_id, batch)
            )
        )
        for room_id, is_visible, is_public in rows:
            found[room_id] = RoomFlags(bool(is_visible), bool(is_public))
    return found


def set_join_rules(conn: Connection, values: dict[str, str | None]) -> None:
    if values:
        conn.execute(
            update(rooms)
            .where(rooms.c.room_id == bindparam("rid"))
            .values(join_rule=bindparam("value")),
            [{"rid": room_id, "value": value} for room_id, value in values.items()],
        )


def set_history_visibility(conn: Connection, values: dict[str, str | None]) -> None:
    if values:
        conn.execute(
            update(rooms)
            .where(rooms.c.room_id == bindparam("rid"))
            .values(history_visibility=bindparam("value")),
            [{"rid": room_id, "value": value} for room_id, value in values.items()],
        )


def recompute_flags(conn: Connection, room_ids: Collection[str]) -> dict[str, RoomFlags]:
    """Derive is_public from the room's state and is_visible from its local members.

    Returns the new flags of the rooms whose flags changed. Rooms whose flags hold
    already are not written: a batch touches thousands of rooms and changes few."""
    has_local_member = exists().where(
        room_members.c.room_id == rooms.c.room_id, room_members.c.is_local
    )
    # The rule of directory.events.is_public, in SQL.
    is_public = or_(
        func.coalesce(rooms.c.join_rule, "") == "public",
        func.coalesce(rooms.c.history_visibility, "") == "world_readable",
    )
    changed: dict[str, RoomFlags] = {}
    for batch in id_batches(conn, room_ids):
        rows = conn.execute(
            update(rooms)
            .where(
                any_of(conn, rooms.c.room_id, batch),
                or_(
                    rooms.c.is_visible.is_distinct_from(has_local_member),
                    rooms.c.is_public.is_distinct_from(is_public),
                ),
            )
            .values(is_visible=has_local_member, is_public=is_public)
            .returning(rooms.c.room_id, rooms.c.is_visible, rooms.c.is_public)
        )
        for room_id, is_visible, is_public_now in rows:
            changed[room_id] = RoomFlags(bool(is_visible), bool(is_public_now))
    return changed


def member_values(
    conn: Connection, pairs: Collection[tuple[str, str]]
) -> dict[tuple[str, str], ProfileValue]:
    """The values each (room, user) last showed in that room, for current joins."""
    m = room_members.c
    found: dict[tuple[str, str], ProfileValue] = {}
    if is_postgresql(conn) and pairs:
        # A join against the pairs as two arrays: one plan whatever the count, where a
        # row-value IN list costs one index probe branch per pair to plan and run.
        keys = rows_as_arrays(room_members, ("room_id", "user_id"), sorted(pairs)).subquery()
        rows = conn.execute(
            select(m.room_id, m.user_id, m.displayname, m.avatar_url).join(
                keys, (m.room_id == keys.c.room_id) & (m.user_id == keys.c.user_id)
            )
        )
        return {(r, u): ProfileValue(d, a) for r, u, d, a in rows}
    for batch in chunks(sorted(pairs)):
        rows = conn.execute(
            select(m.room_id, m.user_id, m.displayname, m.avatar_url).where(
                tuple_(m.room_id, m.user_id).in_(list(batch))
            )
        )
        for room_id, user_id, displayname, avatar_url in rows:
            found[(room_id, user_id)] = ProfileValue(displayname, avatar_url)
    return found


def add_members(conn: Connection, rows: Iterable[tuple[str, str, bool, ProfileValue]]) -> None:
    """Record joins: (room_id, user_id, is_local, value). Joining again updates the value."""
    upsert_rows(
        conn,
        room_members,
        ("room_id", "user_id", "is_local", "displayname", "avatar_url"),
        [
            (room_id, user_id, is_local, value.displayname, value.avatar_url)
            for room_id, user_id, is_local, value in rows
        ],
        conflict=("room_id", "user_id"),
        update=("displayname", "avatar_url"),
    )


def remove_members(conn: Connection, pairs: Iterable[tuple[str, str]]) -> None:
    delete_rows(conn, room_members, ("room_id", "user_id"), pairs)


def members_of(conn: Connection, room_ids: Collection[str]) -> set[str]:
    found: set[str] = set()
    for batch in id_batches(conn, room_ids):
        found.update(
            conn.scalars(
                select(room_members.c.user_id).where(any_of(conn, room_members.c.room_id, batch))
            )
        )
    return found


def forget_rooms(conn: Connection, room_ids: Collection[str]) -> set[str]:
    """Our server left these rooms: their member lists and publicity go stale, so both
    are dropped (a rejoined room is private until read again), with any backfill or
    recheck it was waiting for.

    Returns the users who were members, so the caller can re-check each of them.
    """
    users = members_of(conn, room_ids)
    for batch in id_batches(conn, room_ids):
        conn.execute(delete(room_members).where(any_of(conn, room_members.c.room_id, batch)))
        conn.execute(
            update(rooms)
            .where(any_of(conn, rooms.c.room_id, batch))
            .values(
                join_rule=None,
                history_visibility=None,
                is_public=False,
                backfill_as=None,
                checked_at_ms=None,
                recheck_due_ms=None,
            )
        )
    return users


def mark_backfill(conn: Connection, rooms_as: dict[str, str]) -> None:
    """Remember that these rooms' existing members must be loaded, reading as the user."""
    if rooms_as:
        conn.execute(
            update(rooms)
            .where(rooms.c.room_id == bindparam("rid"))
            .values(backfill_as=bindparam("as_user")),
            [{"rid": room_id, "as_user": user} for room_id, user in rooms_as.items()],
        )


def awaiting_backfill(conn: Connection, limit: int) -> list[tuple[str, str]]:
    return [
        (room_id, as_user)
        for room_id, as_user in conn.execute(
            select(rooms.c.room_id, rooms.c.backfill_as)
            .where(rooms.c.backfill_as.is_not(None))
            .order_by(rooms.c.room_id)
            .limit(limit)
        )
    ]


def backfill_reader(conn: Connection, room_id: str) -> str | None:
    return conn.scalar(select(rooms.c.backfill_as).where(rooms.c.room_id == room_id))


def local_members(conn: Connection, room_id: str) -> list[str]:
    return list(
        conn.scalars(
            select(room_members.c.user_id)
            .where(room_members.c.room_id == room_id, room_members.c.is_local)
            .order_by(room_members.c.user_id)
        )
    )


def clear_backfill(conn: Connection, room_id: str) -> None:
    conn.execute(update(rooms).where(rooms.c.room_id == room_id).values(backfill_as=None))


def lock_rooms(conn: Connection, room_ids: Collection[str]) -> None:
    """Lock these rooms' rows in room order (PostgreSQL), as bump_member_events does."""
    if not is_postgresql(conn):
        return
    for batch in id_batches(conn, room_ids):
        conn.execute(
            select(rooms.c.room_id)
            .where(any_of(conn, rooms.c.room_id, batch))
            .order_by(rooms.c.room_id)
            .with_for_update()
        )


def bump_member_events(conn: Connection, room_ids: Collection[str]) -> None:
    """Count a batch touching these rooms, locking their rows in room order."""
    for batch in id_batches(conn, room_ids):
        conn.execute(
            update(rooms)
            .where(any_of(conn, rooms.c.room_id, batch))
            .values(member_events=rooms.c.member_events + 1)
        )


def member_events(conn: Connection, room_id: str) -> int | None:
    """The room's member-event counter (None: we do not know the room)."""
    return conn.scalar(select(rooms.c.member_events).where(rooms.c.room_id == room_id))


def member_event_counters(
    conn: Connection, room_ids: Collection[str], *, lock: bool = False
) -> dict[str, int]:
    """The member-event counter of each known room among these; with lock, the rows are
    held (in room order) until the transaction ends, so no batch bumps them meanwhile."""
    found: dict[str, int] = {}
    for batch in id_batches(conn, room_ids):
        query = select(rooms.c.room_id, rooms.c.member_events).where(
            any_of(conn, rooms.c.room_id, batch)
        )
        if lock and is_postgresql(conn):
            query = query.order_by(rooms.c.room_id).with_for_update()
        found.update((room_id, int(count)) for room_id, count in conn.execute(query))
    return found


def members_by_room(conn: Connection, room_ids: Collection[str]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    m = room_members.c
    for batch in id_batches(conn, room_ids):
        for room_id, user_id in conn.execute(
            select(m.room_id, m.user_id).where(any_of(conn, m.room_id, batch))
        ):
            found.setdefault(room_id, set()).add(user_id)
    return found


def publicity(
    conn: Connection, room_ids: Collection[str]
) -> dict[str, tuple[str | None, str | None]]:
    """(join_rule, history_visibility) of each known room among these."""
    found: dict[str, tuple[str | None, str | None]] = {}
    for batch in id_batches(conn, room_ids):
        for room_id, join_rule, history in conn.execute(
            select(rooms.c.room_id, rooms.c.join_rule, rooms.c.history_visibility).where(
                any_of(conn, rooms.c.room_id, batch)
            )
        ):
            found[room_id] = (join_rule, history)
    return found


def mark_checked(conn: Connection, recheck_due: dict[str, int], now_ms: int) -> None:
    """A snapshot confirmed these rooms now: whatever backfill they waited for is done,
    and each is read again at its due time."""
    update_rows(
        conn,
        rooms,
        "room_id",
        ("checked_at_ms", "recheck_due_ms", "backfill_as"),
        [(room_id, now_ms, due, None) for room_id, due in sorted(recheck_due.items())],
    )


def due_for_recheck(conn: Connection, now_ms: int, limit: int) -> list[str]:
    """Visible rooms whose check is due, the oldest (never checked) first."""
    due = rooms.c.recheck_due_ms
    return list(
        conn.scalars(
            select(rooms.c.room_id)
            .where(rooms.c.is_visible, or_(due.is_(None), due <= now_ms))
            .order_by(due.is_not(None), due, rooms.c.room_id)
            .limit(limit)
        )
    )


def postpone_recheck(conn: Connection, room_ids: Collection[str], until_ms: int) -> None:
    for batch in id_batches(conn, room_ids):
        conn.execute(
            update(rooms)
            .where(any_of(conn, rooms.c.room_id, batch))
            .values(recheck_due_ms=until_ms)
        )


@dataclass(frozen=True)
class RecheckOutcome:
    read: int  # checked since the read was asked for
    gone: int  # no longer visible (our last local member left, or was found gone)
    unreadable: int  # nobody could read it (its next check was pushed back)


def recheck_outcomes(
    conn: Connection, room_ids: Collection[str], since_ms: int, lease_end_ms: int
) -> RecheckOutcome:
    read = gone = unreadable = 0
    for batch in id_batches(conn, room_ids):
        rows = conn.execute(
            select(rooms.c.is_visible, rooms.c.checked_at_ms, rooms.c.recheck_due_ms).where(
                any_of(conn, rooms.c.room_id, batch)
            )
        )
        for is_visible, checked_at, recheck_due in rows:
            if not is_visible:
                gone += 1
            elif checked_at is not None and checked_at >= since_ms:
                read += 1
            elif recheck_due is not None and recheck_due > lease_end_ms:
                unreadable += 1
    return RecheckOutcome(read, gone, unreadable)


def visible_rooms_among(conn: Connection, room_ids: Collection[str]) -> set[str]:
    found: set[str] = set()
    for batch in id_batches(conn, room_ids):
        found.update(
            conn.scalars(
                select(rooms.c.room_id).where(
                    any_of(conn, rooms.c.room_id, batch), rooms.c.is_visible
                )
            )
        )
    return found


def visible_rooms(conn: Connection) -> list[str]:
    return list(
        conn.scalars(select(rooms.c.room_id).where(rooms.c.is_visible).order_by(rooms.c.room_id))
    )


def count_visible(conn: Connection) -> int:
    return int(conn.scalar(select(func.count()).select_from(rooms).where(rooms.c.is_visible)))


@dataclass(frozen=True)
class MemberRoom:
    """A room a user is joined to, as far as who can find them goes (the member row's
    per-room values are never read here)."""

    room_id: str
    is_visible: bool
    is_public: bool
    join_rule: str | None
    history_visibility: str | None


def rooms_of_member(conn: Connection, user_id: str) -> list[MemberRoom]:
    """Every room we hold the user as joined to, visible or not, in room order."""
    rows = conn.execute(
        select(
            rooms.c.room_id,
            rooms.c.is_visible,
            rooms.c.is_public,
            rooms.c.join_rule,
            rooms.c.history_visibility,
        )
        .join(room_members, room_members.c.room_id == rooms.c.room_id)
        .where(room_members.c.user_id == user_id)
        .order_by(rooms.c.room_id)
    )
    return [
        MemberRoom(room_id, bool(visible), bool(public), join_rule, history)
        for room_id, visible, public, join_rule, history in rows
    ]


def count_per_room_values(conn: Connection, user_id: str) -> int:
    """How many of the user's member rows hold a per-room name or avatar (counted, not
    read)."""
    m = room_members.c
    return int(
        conn.scalar(
            select(func.count())
            .select_from(room_members)
            .where(m.user_id == user_id, or_(m.displayname.is_not(None), m.avatar_url.is_not(None)))
        )
        or 0
    )


def replace_reader(conn: Connection, user_id: str) -> int:
    """Rooms waiting to be read as this user (backfill_as) are read as another local
    member we know instead (none left: not read; the room is no longer visible then).
    Returns how many rooms named the user."""
    other_local = (
        select(func.min(room_members.c.user_id))
        .where(
            room_members.c.room_id == rooms.c.room_id,
            room_members.c.is_local,
            room_members.c.user_id != user_id,
        )
        .scalar_subquery()
    )
    return conn.execute(
        update(rooms).where(rooms.c.backfill_as == user_id).values(backfill_as=other_local)
    ).rowcount


@dataclass(frozen=True)
class CheckProgress:
    visible: int
    # Visible rooms a snapshot confirmed since the given time, and never.
    checked_since: int
    never_checked: int
    # The visible room checked longest ago (None: none was ever checked).
    oldest_checked_at_ms: int | None


def check_progress(conn: Connection, since_ms: int) -> CheckProgress:
    checked = rooms.c.checked_at_ms
    visible, recent, never, oldest = conn.execute(
        select(
            func.count(),
            func.count().filter(checked >= since_ms),
            func.count().filter(checked.is_(None)),
            func.min(checked),
        ).where(rooms.c.is_visible)
    ).one()
    return CheckProgress(int(visible), int(recent), int(never), oldest)
