"""When does an event value deserve a profile fetch? The deduplication rules.

One global rename is echoed into every room the user is in; it must cost one request.
But a value must never be suppressed for good: a value once found to be a per-room
name (the fetch answered something else) may later become the global name, echoed into
the other rooms. A per-room change touches one room, a global one every room, so the
same value arriving from *another* room than the one it was per-room in is treated as
new.

That rule alone would cost a request per room for a value the profile never returns
(a bridge's puppet with the same per-room name in every portal room, events that omit
an avatar the profile has). So the checks that found a value per-room are counted:
the first PER_ROOM_FREE_CHECKS are free, after that the same value from yet another
room asks again only once a pause has passed since the last check, doubling each time
(RECHECK_BASE_MS up to RECHECK_MAX_MS; the scheduled refresh asks daily anyway). A
global change to a value found per-room once is still asked about at once.

These functions are pure: the storage layer loads and saves SeenState.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from directory.events import ProfileValue

# Checks finding a value per-room after which a new room's echo of it waits (one for
# the first sight, one for the echo that looked global).
PER_ROOM_FREE_CHECKS = 2
RECHECK_BASE_MS = 10 * 60 * 1000
RECHECK_MAX_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class SeenState:
    # The last value the events carried for this user, and the first room it came from.
    value: ProfileValue | None
    room_id: str | None
    # The same value also arrived from another room (what a global change looks like).
    elsewhere: bool = False
    # A fetch answered something else: the value is per-room, in room_id.
    per_room: bool = False
    # Fetches that found this value per-room, and when the last one answered.
    checks: int = 0
    checked_at_ms: int | None = None


UNSEEN = SeenState(value=None, room_id=None)


def may_check_again(state: SeenState, now_ms: int) -> bool:
    """Whether a value found per-room may be asked about again now."""
    if state.checks < PER_ROOM_FREE_CHECKS or state.checked_at_ms is None:
        return True
    pause = min(RECHECK_BASE_MS * 2 ** (state.checks - PER_ROOM_FREE_CHECKS), RECHECK_MAX_MS)
    return now_ms >= state.checked_at_ms + pause


def observe(
    state: SeenState, room_id: str, value: ProfileValue, now_ms: int
) -> tuple[SeenState, bool]:
    """A join event carried `value` in `room_id`: the new state, and whether to fetch."""
    if value != state.value:
        return SeenState(value=value, room_id=room_id), True
    if room_id == state.room_id:
        return state, False
    if state.per_room:
        # Known per-room in one room, now seen in another: maybe a global change.
        if may_check_again(state, now_ms):
            return replace(state, room_id=room_id, per_room=False), True
        return state, False
    if state.elsewhere:
        return state, False
    return replace(state, elsewhere=True), False


def after_fetch(state: SeenState, fetched: ProfileValue, now_ms: int) -> tuple[SeenState, bool]:
    """The public profile turned out to be `fetched`: the new state, and whether to fetch again."""
    if state.value is None or fetched == state.value:
        return replace(state, per_room=False, checks=0, checked_at_ms=now_ms), False
    checks = state.checks + 1
    if state.elsewhere:
        # The value came from several rooms, yet the answer differs: the answer may
        # predate a global change still propagating. Ask once more, then judge.
        return replace(state, elsewhere=False, checks=checks, checked_at_ms=now_ms), True
    return replace(state, per_room=True, checks=checks, checked_at_ms=now_ms), False
