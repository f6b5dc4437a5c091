"""Reading a room we can see, for a snapshot: when our server joins it (its existing
members were never sent to us), and when reconciliation checks it.

The room is read through the client API as one of its local members, acting as them
with the appservice token, in one request (its current state: members, join rule and
history visibility at one point in time). The snapshot then goes through the inbox
(directory/snapshots.py), applied in order with the events around it.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, update

from directory.homeserver import HomeserverClient, RoomUnreadable
from directory.models import rooms
from directory.snapshots import SnapshotItem
from directory.storage import rooms as room_store

logger = logging.getLogger(__name__)


def read_room(
    engine: Engine, client: HomeserverClient, room_id: str, purpose: str, attempt: int = 0
) -> SnapshotItem | None:
    """Read the room as the first of its local members who may read it.

    If none may, the item has no snapshot, and as departed the local members the
    homeserver says are not joined any more (a missed leave, repaired through the same
    hooks); with none of those either, nothing can be done (see `unreadable`). None
    when there is nobody to read as. Our homeserver's own failures
    (HomeserverRefused, HomeserverUnavailable, RateLimited) propagate: they say
    nothing about the room.
    """
    with engine.connect() as conn:
        reader = room_store.backfill_reader(conn, room_id)
        local = room_store.local_members(conn, room_id)
        # Noted before the read: events applied after it make the snapshot stale.
        read_after = room_store.member_events(conn, room_id)
    candidates = list(dict.fromkeys([*([reader] if reader else []), *local]))
    departed: list[str] = []
    for as_user in candidates:
        try:
            snapshot = client.room_state(room_id, as_user)
        except RoomUnreadable as exc:
            logger.info("cannot read %s as %s: %s", room_id, as_user, exc)
            if _has_left(client, as_user, room_id):
                departed.append(as_user)
            continue
        return SnapshotItem(room_id, purpose, read_after, snapshot, attempt=attempt)
    if not candidates:
        return None
    return SnapshotItem(
        room_id, purpose, read_after, None, tuple(departed), attempt, tried=tuple(candidates)
    )


def unreadable(item: SnapshotItem) -> bool:
    """No local member could read the room, and none is known to have left it."""
    return item.snapshot is None and not item.departed


def _has_left(client: HomeserverClient, user_id: str, room_id: str) -> bool:
    """Whether the homeserver says this local user is not joined to the room. False
    when it will not say (we may not act as that user)."""
    try:
        return room_id not in client.joined_rooms(user_id)
    except RoomUnreadable:
        return False


def stop_reading(engine: Engine, item: SnapshotItem, retry_at_ms: int) -> None:
    """Nobody could read the room: stop asking until `retry_at_ms`, unless a local
    member we did not try has joined meanwhile (the next read may succeed as them)."""
    with engine.begin() as conn:
        if set(room_store.local_members(conn, item.room_id)) - set(item.tried):
            return
        conn.execute(
            update(rooms)
            .where(rooms.c.room_id == item.room_id)
            .values(backfill_as=None, recheck_due_ms=retry_at_ms)
        )
