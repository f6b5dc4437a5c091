"""What a batch of room events means for the directory (docs/design.md §2).

- A user joined to at least one visible room (one with a local member) has an entry;
  on first sight it is a placeholder showing only the user id, and a fetch is queued.
- Event values (display name, avatar) are only triggers: deduplicated by
  directory.dedup, they queue a fetch of the PUBLIC profile and never reach the entry.
- A user in no visible room any more loses the entry (and any pending fetch).
- Our server leaving a room (its last local member leaves) drops its member list and
  re-checks every member.

A batch is one transaction of set-based statements, whatever its size; processing the
same batch twice leaves the same state and queues nothing new.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection

from directory.dedup import UNSEEN, SeenState, observe
from directory.events import (
    InvalidEvent,
    MemberEvent,
    ProfileValue,
    RoomStateEvent,
    parse_event,
    server_name_of,
)
from directory.listing import ListingRules, configured_unlisted
from directory.storage import entries, pending
from directory.storage import rooms as room_store

logger = logging.getLogger(__name__)

# Scheduled refreshes are spread over the last tenth of the maximum age, so entries
# created together do not all come due in the same minute.
REFRESH_JITTER = 0.1


@dataclass
class BatchOutcome:
    events: int = 0
    invalid: int = 0
    # Destinations that now have due fetches, with how many users this batch queued on
    # each: the caller publishes work for them after the transaction commits.
    fetch_servers: Counter[str] = field(default_factory=Counter)
    # Rooms that just became visible (a local user joined), with one local member to
    # read them as: their existing members were never sent to us. Read at once,
    # whatever is queued already: what was read before the join is stale.
    rooms_to_backfill: dict[str, str] = field(default_factory=dict)
    # Room snapshots refused as stale (directory/snapshots.py): (room_id, purpose,
    # attempt) to read again.
    snapshots_to_retry: list[tuple[str, str, int]] = field(default_factory=list)
    # Bootstrap runs with rooms this batch sent back to be read again.
    bootstrap_runs: set[int] = field(default_factory=set)
    created: int = 0
    deleted: int = 0

    def merge(self, other: BatchOutcome) -> None:
        self.events += other.events
        self.invalid += other.invalid
        self.fetch_servers.update(other.fetch_servers)
        for room_id, reader in other.rooms_to_backfill.items():
            self.rooms_to_backfill.setdefault(room_id, reader)
        self.snapshots_to_retry += other.snapshots_to_retry
        self.bootstrap_runs |= other.bootstrap_runs
        self.created += other.created
        self.deleted += other.deleted


def next_refresh_ms(now_ms: int, max_age_seconds: float) -> int:
    max_age_ms = max_age_seconds * 1000
    return int(now_ms + max_age_ms * (1 - REFRESH_JITTER * random.random()))


def process_events(
    conn: Connection,
    raw_events: Sequence[object],
    *,
    server_name: str,
    now_ms: int,
    profile_max_age_seconds: float,
    count_as_events: bool = True,
    listing: ListingRules | None = None,
) -> BatchOutcome:
    """Apply one batch of events in the caller's transaction.

    `count_as_events`: bump the rooms' member-event counters (live events do; a room
    snapshot, which only restates the room as it is, does not, so that two snapshots
    read between the same events are both current). `listing`: the rules new entries
    are created unlisted by (without, they are created listed until the next sweep,
    directory/listing.py)."""
    outcome = BatchOutcome(events=len(raw_events))
    members: list[MemberEvent] = []
    join_rules: dict[str, str | None] = {}
    history_visibility: dict[str, str | None] = {}
    for index, raw in enumerate(raw_events):
        try:
            parsed = parse_event(raw)
        except InvalidEvent as exc:
            outcome.invalid += 1
            logger.warning("skipping invalid event #%d of batch: %s", index, exc)
            continue
        if isinstance(parsed, MemberEvent):
            members.append(parsed)
        elif isinstance(parsed, RoomStateEvent):
            target = join_rules if parsed.key == "join_rule" else history_visibility
            target[parsed.room_id] = parsed.value

    room_ids = {m.room_id for m in members} | join_rules.keys() | history_visibility.keys()
    if not room_ids:
        return outcome
    room_store.ensure_rooms(conn, room_ids)
    # First, and in room order: the batch locks its rooms' rows before anything else.
    # The inbox consumer is the only writer of memberships, but other tasks update a
    # room's bookkeeping columns; one lock order keeps them from deadlocking.
    if count_as_events:
        room_store.bump_member_events(conn, room_ids)
    else:
        room_store.lock_rooms(conn, room_ids)
    before = room_store.flags(conn, room_ids)

    room_store.set_join_rules(conn, join_rules)
    room_store.set_history_visibility(conn, history_visibility)
    # Only the last event per (room, user) decides the membership.
    final: dict[tuple[str, str], MemberEvent] = {(m.room_id, m.user_id): m for m in members}
    changes = _changes_in_room(conn, members)
    room_store.add_members(
        conn,
        (
            (room_id, user_id, m.server_name == server_name, m.value)
            for (room_id, user_id), m in final.items()
            if m.membership == "join"
        ),
    )
    room_store.remove_members(conn, (key for key, m in final.items() if m.membership != "join"))
    # A room's flags follow from its state events (is_public) and its local members
    # (is_visible): only rooms where this batch changed either can change.
    may_change = (
        join_rules.keys()
        | history_visibility.keys()
        | {m.room_id for m in members if m.server_name == server_name}
    )
    after = before | room_store.recompute_flags(conn, may_change)

    became_visible = {r for r in room_ids if after[r].is_visible and not before[r].is_visible}
    became_invisible = {r for r in room_ids if before[r].is_visible and not after[r].is_visible}
    publicity_changed = {r for r in room_ids if after[r].is_public != before[r].is_public}

    affected = {m.user_id for m in members}
    # Our server left: what we knew of these rooms goes stale, their publicity too (a
    # room rejoined later counts as private until it has been read again).
    affected |= room_store.forget_rooms(conn, became_invisible)
    affected |= room_store.members_of(conn, became_visible | publicity_changed)
    for (room_id, user_id), m in final.items():
        if room_id in became_visible and m.membership == "join" and m.server_name == server_name:
            outcome.rooms_to_backfill.setdefault(room_id, user_id)
    room_store.mark_backfill(conn, outcome.rooms_to_backfill)

    to_fetch, created, deleted = reconcile_users(
        conn,
        affected,
        changes,
        now_ms=now_ms,
        profile_max_age_seconds=profile_max_age_seconds,
        listing=listing,
    )
    outcome.created, outcome.deleted = created, deleted
    pending.queue(conn, to_fetch, "event", now_ms)
    outcome.fetch_servers = Counter(server_name_of(user_id) for user_id in to_fetch)
    return outcome


def _changes_in_room(
    conn: Connection, members: list[MemberEvent]
) -> list[tuple[str, str, ProfileValue]]:
    """The joins that show a user in a room with a value that room had not shown before:
    (user_id, room_id, value), in event order. A replayed event is no change, so a
    replayed batch triggers nothing."""
    joins = [m for m in members if m.membership == "join"]
    current: dict[tuple[str, str], ProfileValue | None] = dict(
        room_store.member_values(conn, {(m.room_id, m.user_id) for m in joins})
    )
    changes = []
    for m in members:
        key = (m.room_id, m.user_id)
        if m.membership != "join":
            current[key] = None
        elif current.get(key) != m.value:
            current[key] = m.value
            changes.append((m.user_id, m.room_id, m.value))
    return changes


def reconcile_users(
    conn: Connection,
    affected: set[str],
    join_observations: Iterable[tuple[str, str, ProfileValue]],
    *,
    now_ms: int,
    profile_max_age_seconds: float,
    listing: ListingRules | None = None,
) -> tuple[set[str], int, int]:
    """Bring the entries of `affected` users in line with their memberships.

    Returns the users to fetch, and how many entries were created and deleted.
    """
    public_flags = entries.visible_users(conn, affected)
    visible = public_flags.keys()
    deleted = entries.delete_entries(conn, affected - visible)
    existing = entries.seen_states(conn, visible)
    new_users = visible - existing.keys()

    states: dict[str, SeenState] = {user_id: UNSEEN for user_id in new_users}
    states.update(existing)
    changed: set[str] = set()
    to_fetch = set(new_users)
    for user_id, room_id, value in join_observations:
        if user_id not in visible:
            continue
        state, fetch = observe(states[user_id], room_id, value, now_ms)
        if state != states[user_id]:
            states[user_id] = state
            changed.add(user_id)
        if fetch:
            to_fetch.add(user_id)

    entries.create_placeholders(
        conn,
        {user_id: states[user_id] for user_id in new_users},
        now_ms,
        next_refresh_ms(now_ms, profile_max_age_seconds),
        in_public_room={user_id for user_id in new_users if public_flags[user_id]},
        unlisted=configured_unlisted(listing, sorted(new_users)) if listing else None,
    )
    entries.save_seen(conn, {u: states[u] for u in changed - new_users})
    # Every visible user, the new ones included: a concurrent writer (a backfill) may
    # have created an entry the placeholder INSERT then left as it was.
    entries.set_public_flags(conn, public_flags)
    return to_fetch, len(new_users), deleted
