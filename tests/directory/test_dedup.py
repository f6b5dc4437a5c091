"""The deduplication rules alone: one change costs one fetch, and no value is
suppressed for good (docs/design.md §8, scenarios 3 and 4), including the race where a global
change arrives while a fetch that predates it is in flight."""

from __future__ import annotations

from dataclasses import replace

from directory.dedup import RECHECK_BASE_MS, UNSEEN, SeenState, after_fetch, observe
from directory.events import ProfileValue

ALICE = ProfileValue("Alice", None)
DELIA = ProfileValue("Delia", None)
NOW = 1_700_000_000_000


def observe_all(state: SeenState, *seen: tuple[str, ProfileValue]) -> tuple[SeenState, int]:
    fetches = 0
    for room_id, value in seen:
        state, fetch = observe(state, room_id, value, NOW)
        fetches += fetch
    return state, fetches


def test_one_value_echoed_into_many_rooms_asks_once() -> None:
    state, fetches = observe_all(UNSEEN, *((f"!r{i}", ALICE) for i in range(500)))
    assert fetches == 1
    assert state.value == ALICE and state.elsewhere


def test_the_same_value_again_in_the_same_room_asks_nothing() -> None:
    state, _ = observe_all(UNSEEN, ("!a", ALICE))
    assert observe(state, "!a", ALICE, NOW) == (state, False)


def test_a_new_value_always_asks() -> None:
    state, _ = observe_all(UNSEEN, ("!a", ALICE))
    state, fetch = observe(state, "!a", DELIA, NOW)
    assert fetch and state.value == DELIA and state.room_id == "!a"


def test_a_value_found_per_room_is_new_again_from_another_room() -> None:
    state, _ = observe_all(UNSEEN, ("!a", ALICE), ("!p", DELIA))
    state, again = after_fetch(state, ALICE, NOW)  # the public name differs: Delia is per-room
    assert not again and state.per_room and state.room_id == "!p"
    assert observe(state, "!p", DELIA, NOW) == (state, False)  # same room: still per-room
    state, fetch = observe(state, "!a", DELIA, NOW)  # another room: looks global now
    assert fetch and not state.per_room


def test_a_confirmed_value_clears_the_per_room_mark() -> None:
    state, _ = observe_all(UNSEEN, ("!p", DELIA))
    state, _ = after_fetch(state, ALICE, NOW)
    state, _ = observe(state, "!a", DELIA, NOW)
    state, again = after_fetch(state, DELIA, NOW)
    assert not again and not state.per_room
    assert observe(state, "!b", DELIA, NOW)[1] is False


def test_an_answer_that_predates_a_global_change_asks_once_more() -> None:
    # Per-room Delia in !p queues a fetch; while it is in flight the user makes Delia
    # global, echoed into !a; the in-flight answer still says Alice.
    state, _ = observe_all(UNSEEN, ("!p", DELIA))
    state, fetch = observe(state, "!a", DELIA, NOW)
    assert not fetch and state.elsewhere
    state, again = after_fetch(state, ALICE, NOW)
    assert again and not state.per_room
    # The second answer is authoritative, whatever it says.
    assert after_fetch(state, ALICE, NOW) == (SeenState(DELIA, "!p", False, True, 2, NOW), False)


def test_answers_for_an_unseen_value_change_nothing() -> None:
    assert after_fetch(UNSEEN, ALICE, NOW) == (replace(UNSEEN, checked_at_ms=NOW), False)


def test_a_value_the_profile_never_returns_costs_two_fetches_however_many_rooms() -> None:
    """A bridge's puppet: the same per-room name in every portal room, a public name
    that differs. First sight, one more ask for the echo that looked global, then the
    other rooms ask nothing."""
    ghost = ProfileValue("Puppet [bridge]", None)
    state, fetches = observe_all(UNSEEN, ("!r0", ghost), ("!r1", ghost))
    state, again = after_fetch(state, ALICE, NOW)
    fetches += again
    state, again = after_fetch(state, ALICE, NOW)
    fetches += again
    assert state.per_room and state.checks == 2
    for i in range(2, 1_000):
        state, fetch = observe(state, f"!r{i}", ghost, NOW + i)
        fetches += fetch
    assert fetches == 2


def test_a_value_checked_per_room_twice_is_asked_again_after_a_growing_pause() -> None:
    state = SeenState(DELIA, "!p", per_room=True, checks=2, checked_at_ms=NOW)
    assert observe(state, "!a", DELIA, NOW + RECHECK_BASE_MS - 1) == (state, False)
    state, fetch = observe(state, "!a", DELIA, NOW + RECHECK_BASE_MS)
    assert fetch and not state.per_room
    state, _ = after_fetch(state, ALICE, NOW + RECHECK_BASE_MS)
    assert state.checks == 3
    later = NOW + RECHECK_BASE_MS
    assert observe(state, "!b", DELIA, later + 2 * RECHECK_BASE_MS - 1)[1] is False
    assert observe(state, "!b", DELIA, later + 2 * RECHECK_BASE_MS)[1] is True


def test_a_confirmed_value_starts_the_count_afresh() -> None:
    state = SeenState(DELIA, "!p", per_room=True, checks=5, checked_at_ms=NOW)
    state, _ = observe(state, "!a", ALICE, NOW)
    state, again = after_fetch(state, ALICE, NOW)
    assert not again and state.checks == 0 and not state.per_room
