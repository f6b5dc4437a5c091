"""When does an event value deserve a profile fetch? The deduplication rules.

One global rename is echoed into every room the user is in; it must cost one request.
But a value must never be suppressed for good: a value once found to be a per-room
name (the fetch answered something else) may later become the global name, echoed into
the other rooms. A per-room change touches one room, a global one every room, so the
same value arriving from *another* room than the one it was per-room in is treated as
new.

These functions are pure: the storage layer loads and saves SeenState.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from directory.events import ProfileValue


@dataclass(frozen=True)
class SeenState:
    # The last value the events carried for this user, and the first room it came from.
    value: ProfileValue | None
    room_id: str | None
    # The same value also arrived from another room (what a global change looks like).
    elsewhere: bool = False
    # A fetch answered something else: the value is per-room, in room_id.
    per_room: bool = False


UNSEEN = SeenState(value=None, room_id=None)


def observe(state: SeenState, room_id: str, value: ProfileValue) -> tuple[SeenState, bool]:
    """A join event carried `value` in `room_id`: the new state, and whether to fetch."""
    if value != state.value:
        return SeenState(value=value, room_id=room_id), True
    if room_id == state.room_id:
        return state, False
    if state.per_room:
        # Known per-room in one room, now seen in another: likely a global change.
        return SeenState(value=value, room_id=room_id), True
    if state.elsewhere:
        return state, False
    return replace(state, elsewhere=True), False


def after_fetch(state: SeenState, fetched: ProfileValue) -> tuple[SeenState, bool]:
    """The public profile turned out to be `fetched`: the new state, and whether to fetch again."""
    if state.value is None or fetched == state.value:
        return replace(state, per_room=False), False
    if state.elsewhere:
        # The value came from several rooms, yet the answer differs: the answer may
        # predate a global change still propagating. Ask once more, then judge.
        return replace(state, elsewhere=False), True
    return replace(state, per_room=True), False
