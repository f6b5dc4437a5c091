"""Room snapshots: a room's members and publicity as our homeserver shows them now,
read over HTTP (a backfill when our server joins a room, the bootstrap, the scheduled
reconciliation) and applied by the inbox consumer, in order with the events around
them, through the same hooks as events. Member values stay triggers only.

The consumer is the one writer of memberships: a snapshot is never applied while a
batch of events is half-applied, nor the other way round (the race where a backfill
wrote visibility computed from state a concurrent batch had just changed).

A snapshot read before events it does not reflect must not undo them: the room's
member-event counter is noted before the read (`read_after`), and if a batch of events
for the room was applied since, the snapshot is refused and the room read again.
Snapshots themselves do not move the counter, so two snapshots read between the same
events are both current.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection

from directory.events import ProfileValue
from directory.homeserver import RoomSnapshot
from directory.listing import ListingRules
from directory.membership import BatchOutcome, process_events
from directory.storage import bootstrap as bootstrap_store
from directory.storage import counters
from directory.storage import rooms as room_store
from directory.telemetry import REPAIRS_PREFIX, SNAPSHOTS_PREFIX

# Why a room was read; each counts its snapshots apart, and only reconciliation's
# differences count as repairs (a backfill or bootstrap is expected to find members).
BACKFILL, BOOTSTRAP, RECONCILE = "backfill", "bootstrap", "reconcile"
PURPOSES = (BACKFILL, BOOTSTRAP, RECONCILE)
# Rechecks are spread over the last tenth of ROOM_RECHECK_SECONDS, so rooms loaded
# together (a bootstrap) do not all come due in the same minute.
RECHECK_JITTER = 0.1
# A refused snapshot's room is read again after this, doubling per refusal: a room
# busy with member events gets a quiet moment sooner or later.
REREAD_BASE_MS = 200
REREAD_MAX_MS = 60_000
# The counter names this module adds to (REPAIRS_PREFIX, SNAPSHOTS_PREFIX) are
# directory/telemetry.py's, imported here for the callers that read them.


@dataclass(frozen=True)
class SnapshotItem:
    """One room read, as it waits in the inbox."""

    room_id: str
    purpose: str
    # The room's member-event counter before the read (None: the room was unknown).
    read_after: int | None
    # What was read; None when no local member could read the room, and `departed`
    # holds the local members the homeserver says are not joined any more.
    snapshot: RoomSnapshot | None
    departed: tuple[str, ...] = ()
    attempt: int = 0
    run_id: int | None = None
    # The local members it was read as (or tried as), for the reader only: not queued.
    tried: tuple[str, ...] = field(default=(), compare=False)

    @property
    def size(self) -> int:
        """Its weight in a batch, in events."""
        return max(1, len(self.snapshot.joined) if self.snapshot else len(self.departed))

    def to_payload(self) -> dict:
        snapshot = None
        if self.snapshot is not None:
            snapshot = {
                "join_rule": self.snapshot.join_rule,
                "history_visibility": self.snapshot.history_visibility,
                "joined": {
                    user: [value.displayname, value.avatar_url]
                    for user, value in self.snapshot.joined.items()
                },
            }
        return {
            "room_id": self.room_id,
            "purpose": self.purpose,
            "read_after": self.read_after,
            "snapshot": snapshot,
            "departed": list(self.departed),
            "attempt": self.attempt,
            "run_id": self.run_id,
        }

    @classmethod
    def from_payload(cls, payload: dict) -> SnapshotItem:
        raw = payload.get("snapshot")
        snapshot = None
        if raw is not None:
            snapshot = RoomSnapshot(
                joined={
                    user: ProfileValue(name, avatar)
                    for user, (name, avatar) in raw["joined"].items()
                },
                join_rule=raw["join_rule"],
                history_visibility=raw["history_visibility"],
            )
        return cls(
            room_id=payload["room_id"],
            purpose=payload["purpose"],
            read_after=payload["read_after"],
            snapshot=snapshot,
            departed=tuple(payload.get("departed") or ()),
            attempt=int(payload.get("attempt") or 0),
            run_id=payload.get("run_id"),
        )


@dataclass
class _Applied:
    members: dict[str, int] = field(default_factory=dict)
    repairs: Counter[str] = field(default_factory=Counter)
    tally: Counter[str] = field(default_factory=Counter)


def reread_delay_ms(attempt: int) -> int:
    return min(REREAD_BASE_MS * 2**attempt, REREAD_MAX_MS)


def next_recheck_ms(now_ms: int, recheck_seconds: float) -> int:
    return int(now_ms + recheck_seconds * 1000 * (1 - RECHECK_JITTER * random.random()))


def apply_snapshots(
    conn: Connection,
    items: Sequence[SnapshotItem],
    *,
    server_name: str,
    now_ms: int,
    profile_max_age_seconds: float,
    recheck_seconds: float,
    listing: ListingRules | None = None,
) -> BatchOutcome:
    """Apply consecutive snapshot items of the inbox, in the consumer's transaction."""
    outcome = BatchOutcome()
    applied = _Applied()
    for group in _rounds(items):
        outcome.merge(
            _apply_group(
                conn,
                group,
                applied,
                server_name=server_name,
                now_ms=now_ms,
                profile_max_age_seconds=profile_max_age_seconds,
                recheck_seconds=recheck_seconds,
                listing=listing,
            )
        )
    counters.add(conn, {REPAIRS_PREFIX + kind: n for kind, n in applied.repairs.items()})
    counters.add(conn, {SNAPSHOTS_PREFIX + key: n for key, n in applied.tally.items()})
    return outcome


def _rounds(items: Sequence[SnapshotItem]) -> Iterable[list[SnapshotItem]]:
    """The items in order, cut so that no room appears twice in one group (each group
    is applied as one set-based batch)."""
    group: list[SnapshotItem] = []
    rooms: set[str] = set()
    for item in items:
        if item.room_id in rooms:
            yield group
            group, rooms = [], set()
        group.append(item)
        rooms.add(item.room_id)
    if group:
        yield group


def _apply_group(
    conn: Connection,
    items: list[SnapshotItem],
    applied: _Applied,
    *,
    server_name: str,
    now_ms: int,
    profile_max_age_seconds: float,
    recheck_seconds: float,
    listing: ListingRules | None = None,
) -> BatchOutcome:
    room_ids = {item.room_id for item in items}
    # Locked until commit, in room order, like every batch of events.
    seen = room_store.member_event_counters(conn, room_ids, lock=True)
    current = [item for item in items if seen.get(item.room_id) == item.read_after]
    stale = [item for item in items if seen.get(item.room_id) != item.read_after]

    outcome = BatchOutcome()
    for item in stale:
        applied.tally[f"{item.purpose}:refused"] += 1
        if item.run_id is not None:
            bootstrap_store.postpone_rooms(
                conn,
                item.run_id,
                [item.room_id],
                now_ms + reread_delay_ms(item.attempt),
                "read again: member events arrived while it was read",
            )
            outcome.bootstrap_runs.add(item.run_id)
        else:
            outcome.snapshots_to_retry.append((item.room_id, item.purpose, item.attempt + 1))
    if not current:
        return outcome

    rooms = {item.room_id for item in current}
    known = room_store.members_by_room(conn, rooms)
    publicity = room_store.publicity(conn, rooms)
    events: list[dict] = []
    for item in current:
        members = known.get(item.room_id, set())
        events += _events_of(item, members)
        applied.tally[f"{item.purpose}:applied"] += 1
        if item.purpose == RECONCILE:
            applied.repairs.update(_differences(item, members, publicity.get(item.room_id)))
    outcome.merge(
        process_events(
            conn,
            events,
            server_name=server_name,
            now_ms=now_ms,
            profile_max_age_seconds=profile_max_age_seconds,
            count_as_events=False,
            listing=listing,
        )
    )
    # A full snapshot answers whatever the room waited for (its backfill, its check),
    # including the backfill the hooks ask for when it makes the room visible.
    checked = {item.room_id for item in current if item.snapshot is not None}
    for room_id in checked:
        outcome.rooms_to_backfill.pop(room_id, None)
    room_store.mark_checked(
        conn,
        {room: next_recheck_ms(now_ms, recheck_seconds) for room in checked},
        now_ms,
    )
    loaded: dict[int, dict[str, int]] = {}
    for item in current:
        if item.run_id is not None:
            count = len(item.snapshot.joined) if item.snapshot else 0
            loaded.setdefault(item.run_id, {})[item.room_id] = count
    for run_id, members in loaded.items():
        bootstrap_store.rooms_loaded(conn, run_id, members, now_ms)
        bootstrap_store.finish_if_done(conn, run_id, now_ms)
    return outcome


def _events_of(item: SnapshotItem, known: set[str]) -> list[dict]:
    """The snapshot as the events that would have produced it: publicity (a missing
    value as content without it, so the room counts as not public), those we knew who
    are gone, then the joined members with their values."""
    room_id = item.room_id
    if item.snapshot is None:
        return [_member(room_id, user, {"membership": "leave"}) for user in item.departed]
    snapshot = item.snapshot
    events = [
        _state(room_id, "m.room.join_rules", {"join_rule": snapshot.join_rule}),
        _state(
            room_id,
            "m.room.history_visibility",
            {"history_visibility": snapshot.history_visibility},
        ),
    ]
    for user_id in sorted(known - snapshot.joined.keys()):
        events.append(_member(room_id, user_id, {"membership": "leave"}))
    for user_id, value in sorted(snapshot.joined.items()):
        content: dict[str, object] = {"membership": "join"}
        if value.displayname is not None:
            content["displayname"] = value.displayname
        if value.avatar_url is not None:
            content["avatar_url"] = value.avatar_url
        events.append(_member(room_id, user_id, content))
    return events


def _differences(
    item: SnapshotItem, known: set[str], publicity: tuple[str | None, str | None] | None
) -> Counter[str]:
    """What a reconciliation read found that the events had not told us."""
    found: Counter[str] = Counter()
    if item.snapshot is None:
        found["members_removed"] += len(set(item.departed) & known)
        return found
    joined = item.snapshot.joined.keys()
    found["members_added"] += len(joined - known)
    found["members_removed"] += len(known - joined)
    join_rule, history_visibility = publicity or (None, None)
    if join_rule != item.snapshot.join_rule:
        found["join_rule"] += 1
    if history_visibility != item.snapshot.history_visibility:
        found["history_visibility"] += 1
    return found


def _state(room_id: str, event_type: str, content: dict) -> dict:
    return {"type": event_type, "room_id": room_id, "state_key": "", "content": content}


def _member(room_id: str, user_id: str, content: dict) -> dict:
    return {"type": "m.room.member", "room_id": room_id, "state_key": user_id, "content": content}
