"""SQL for bootstrap runs: the run, the rooms it lists and loads, the users it lists
rooms of (directory/bootstrap.py explains the flow).

A room is "listed" (to read; claimed while next_attempt_ms is in the future), "read"
(its snapshot waits in the inbox), "loaded" (applied) or "failed" (given up, with why).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, and_, bindparam, case, delete, func, insert, select, update

from directory.models import bootstrap_rooms, bootstrap_runs, bootstrap_users, room_members
from directory.storage.common import any_of, chunks, id_batches, upsert_rows

LISTED, READ, LOADED, FAILED = "listed", "read", "loaded", "failed"
# Progress rates are measured over this window.
RATE_WINDOW_MS = 60_000

r = bootstrap_rooms.c
u = bootstrap_users.c


@dataclass(frozen=True)
class Run:
    id: int
    source: str
    started_at_ms: int
    listed_at_ms: int | None
    finished_at_ms: int | None
    list_cursor: str | None
    rooms_reported: int | None
    last_error: str | None
    last_error_at_ms: int | None


@dataclass(frozen=True)
class RoomToRead:
    room_id: str
    read_as: str | None
    attempts: int


@dataclass(frozen=True)
class Progress:
    listed: int  # every room the run has listed so far
    waiting: int  # listed, not read yet
    read: int  # snapshot in the inbox
    loaded: int
    failed: int
    memberships: int  # joined members of the loaded rooms
    # Loaded in the last RATE_WINDOW_MS, for a rate.
    recent_rooms: int
    recent_memberships: int
    users_total: int
    users_listed: int

    @property
    def remaining(self) -> int:
        return self.waiting + self.read


_RUN_COLUMNS = (
    bootstrap_runs.c.id,
    bootstrap_runs.c.source,
    bootstrap_runs.c.started_at_ms,
    bootstrap_runs.c.listed_at_ms,
    bootstrap_runs.c.finished_at_ms,
    bootstrap_runs.c.list_cursor,
    bootstrap_runs.c.rooms_reported,
    bootstrap_runs.c.last_error,
    bootstrap_runs.c.last_error_at_ms,
)


def _run(row: object) -> Run | None:
    return None if row is None else Run(*row)  # type: ignore[misc]


def active_run(conn: Connection) -> Run | None:
    return _run(conn.execute(select(*_RUN_COLUMNS).where(bootstrap_runs.c.active == 1)).first())


def latest_run(conn: Connection) -> Run | None:
    return _run(
        conn.execute(select(*_RUN_COLUMNS).order_by(bootstrap_runs.c.id.desc()).limit(1)).first()
    )


def get_run(conn: Connection, run_id: int) -> Run | None:
    return _run(conn.execute(select(*_RUN_COLUMNS).where(bootstrap_runs.c.id == run_id)).first())


def create_run(conn: Connection, source: str, now_ms: int, users: Iterable[str] = ()) -> int:
    """A new active run (IntegrityError if one is active already); older runs' rooms
    and users go, their summaries stay."""
    run_id = conn.scalar(
        insert(bootstrap_runs)
        .values(source=source, active=1, started_at_ms=now_ms)
        .returning(bootstrap_runs.c.id)
    )
    for table in (bootstrap_rooms, bootstrap_users):
        conn.execute(delete(table).where(table.c.run_id != run_id))
    upsert_rows(
        conn,
        bootstrap_users,
        ("run_id", "user_id", "position", "listed"),
        [(run_id, user, position, False) for position, user in enumerate(users)],
        conflict=("run_id", "user_id"),
    )
    return int(run_id)


def record_error(conn: Connection, run_id: int, error: str | None, now_ms: int) -> None:
    """What keeps the run from going on (None: nothing any more)."""
    conn.execute(
        update(bootstrap_runs)
        .where(bootstrap_runs.c.id == run_id)
        .values(last_error=error, last_error_at_ms=None if error is None else now_ms)
    )


def add_rooms(
    conn: Connection, run_id: int, rooms: Iterable[tuple[str, str | None]], now_ms: int
) -> None:
    """List rooms (room_id, read_as); a room listed already keeps its first reader."""
    upsert_rows(
        conn,
        bootstrap_rooms,
        ("run_id", "room_id", "read_as", "state", "attempts", "next_attempt_ms", "updated_at_ms"),
        [(run_id, room, read_as, LISTED, 0, now_ms, now_ms) for room, read_as in rooms],
        conflict=("run_id", "room_id"),
    )


def save_cursor(
    conn: Connection, run_id: int, cursor: str | None, rooms_reported: int | None = None
) -> None:
    values: dict[str, object] = {"list_cursor": cursor}
    if rooms_reported is not None:
        values["rooms_reported"] = rooms_reported
    conn.execute(update(bootstrap_runs).where(bootstrap_runs.c.id == run_id).values(**values))


def listing_done(conn: Connection, run_id: int, now_ms: int) -> None:
    conn.execute(
        update(bootstrap_runs)
        .where(bootstrap_runs.c.id == run_id, bootstrap_runs.c.listed_at_ms.is_(None))
        .values(listed_at_ms=now_ms)
    )


def users_to_list(conn: Connection, run_id: int, limit: int) -> list[str]:
    return list(
        conn.scalars(
            select(u.user_id)
            .where(u.run_id == run_id, u.listed.is_(False))
            .order_by(u.position)
            .limit(limit)
        )
    )


def users_listed(conn: Connection, run_id: int, errors: Mapping[str, str | None]) -> None:
    """These users' rooms are listed (or could not be: the error says why)."""
    if errors:
        conn.execute(
            update(bootstrap_users)
            .where(u.run_id == run_id, u.user_id == bindparam("uid"))
            .values(listed=True, last_error=bindparam("error")),
            [{"uid": user, "error": error} for user, error in errors.items()],
        )


def claim_rooms(
    conn: Connection, run_id: int, now_ms: int, lease_until_ms: int, limit: int
) -> list[RoomToRead]:
    """Due listed rooms, for one loader, hidden from the others until the lease ends."""
    due = (
        select(r.room_id)
        .where(r.run_id == run_id, r.state == LISTED, r.next_attempt_ms <= now_ms)
        .order_by(r.next_attempt_ms, r.room_id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    # A CTE runs once (see pending.claim): the claim never takes more than `limit`.
    taken = due.cte("taken")
    rows = conn.execute(
        update(bootstrap_rooms)
        .where(r.run_id == run_id, r.room_id == taken.c.room_id)
        .values(next_attempt_ms=lease_until_ms)
        .returning(r.room_id, r.read_as, r.attempts)
    )
    return sorted((RoomToRead(*row) for row in rows), key=lambda room: room.room_id)


def _set_rooms(conn: Connection, run_id: int, room_ids: Collection[str], **values: object) -> None:
    for batch in id_batches(conn, room_ids):
        conn.execute(
            update(bootstrap_rooms)
            .where(r.run_id == run_id, any_of(conn, r.room_id, batch))
            .values(**values)
        )


def rooms_read(conn: Connection, run_id: int, room_ids: Collection[str], now_ms: int) -> None:
    _set_rooms(conn, run_id, room_ids, state=READ, last_error=None, updated_at_ms=now_ms)


def postpone_rooms(
    conn: Connection, run_id: int, room_ids: Collection[str], when_ms: int, error: str | None
) -> None:
    """Back to the listed rooms, due at `when_ms`, without counting an attempt."""
    _set_rooms(
        conn,
        run_id,
        room_ids,
        state=LISTED,
        next_attempt_ms=when_ms,
        last_error=error,
        updated_at_ms=when_ms,
    )


def room_attempt_failed(
    conn: Connection,
    run_id: int,
    room_id: str,
    attempts: int,
    retry_at_ms: int | None,
    error: str,
    now_ms: int,
) -> None:
    """Count a failed read; retry_at_ms None gives the room up."""
    conn.execute(
        update(bootstrap_rooms)
        .where(r.run_id == run_id, r.room_id == room_id)
        .values(
            state=FAILED if retry_at_ms is None else LISTED,
            attempts=attempts,
            next_attempt_ms=now_ms if retry_at_ms is None else retry_at_ms,
            last_error=error[:500],
            updated_at_ms=now_ms,
        )
    )


def rooms_loaded(conn: Connection, run_id: int, members: Mapping[str, int], now_ms: int) -> None:
    for batch in chunks(sorted(members.items())):
        conn.execute(
            update(bootstrap_rooms)
            .where(r.run_id == run_id, r.room_id == bindparam("rid"))
            .values(state=LOADED, members=bindparam("members"), updated_at_ms=now_ms),
            [{"rid": room, "members": count} for room, count in batch],
        )


def resume(conn: Connection, run_id: int, now_ms: int) -> None:
    """An operator ran the bootstrap again: failed rooms get a fresh budget and every
    waiting room (a backoff, or the lease of a loader that died) is due now."""
    conn.execute(
        update(bootstrap_rooms)
        .where(r.run_id == run_id, r.state.in_((LISTED, FAILED)))
        .values(state=LISTED, attempts=0, next_attempt_ms=now_ms)
    )


def next_due_ms(conn: Connection, run_id: int) -> int | None:
    """When the run's next listed room may be read (None: none is listed)."""
    return conn.scalar(
        select(func.min(r.next_attempt_ms)).where(r.run_id == run_id, r.state == LISTED)
    )


def close_run(conn: Connection, run_id: int, now_ms: int) -> None:
    conn.execute(
        update(bootstrap_runs)
        .where(bootstrap_runs.c.id == run_id)
        .values(active=None, finished_at_ms=now_ms)
    )


def finish_if_done(conn: Connection, run_id: int, now_ms: int) -> bool:
    """Close the run once it is listed and every room is loaded or failed."""
    open_rooms = select(r.room_id).where(r.run_id == run_id, r.state.in_((LISTED, READ))).limit(1)
    if conn.scalar(open_rooms) is not None:
        return False
    return bool(
        conn.execute(
            update(bootstrap_runs)
            .where(
                bootstrap_runs.c.id == run_id,
                bootstrap_runs.c.active == 1,
                bootstrap_runs.c.listed_at_ms.is_not(None),
            )
            .values(active=None, finished_at_ms=now_ms)
        ).rowcount
    )


def progress(conn: Connection, run_id: int, now_ms: int) -> Progress:
    recent = r.updated_at_ms > now_ms - RATE_WINDOW_MS

    def count(condition: object) -> object:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    row = conn.execute(
        select(
            func.count(),
            count(r.state == LISTED),
            count(r.state == READ),
            count(r.state == LOADED),
            count(r.state == FAILED),
            func.coalesce(func.sum(r.members), 0),
            count(and_(r.state == LOADED, recent)),
            func.coalesce(func.sum(case((and_(r.state == LOADED, recent), r.members), else_=0)), 0),
        ).where(r.run_id == run_id)
    ).one()
    users_total, users_done = conn.execute(
        select(func.count(), count(u.listed.is_(True))).where(u.run_id == run_id)
    ).one()
    return Progress(*(int(value) for value in row), int(users_total), int(users_done))


def failed_rooms(conn: Connection, run_id: int, limit: int) -> list[tuple[str, str | None]]:
    return [
        (room, error)
        for room, error in conn.execute(
            select(r.room_id, r.last_error)
            .where(r.run_id == run_id, r.state == FAILED)
            .order_by(r.room_id)
            .limit(limit)
        )
    ]


def forget_user(conn: Connection, user_id: str) -> int:
    """An erasure: no bootstrap run names the user any more. Their place in a users
    file's list goes; a room to be read as them is read as another local member we
    know (none: with the admin API, which a run from a users file may lack; the room
    then fails and the next run lists it again). Returns the rows that named them."""
    removed = conn.execute(delete(bootstrap_users).where(u.user_id == user_id)).rowcount
    other_local = (
        select(func.min(room_members.c.user_id))
        .where(
            room_members.c.room_id == r.room_id,
            room_members.c.is_local,
            room_members.c.user_id != user_id,
        )
        .scalar_subquery()
    )
    removed += conn.execute(
        update(bootstrap_rooms).where(r.read_as == user_id).values(read_as=other_local)
    ).rowcount
    return removed
