"""The deduplication rules alone: one change costs one fetch, and no value is
suppressed for good (BRIEF §2, scenarios 3 and 4), including the race where a global
change arrives while a fetch that predates it is in flight."""

from __future__ import annotations

from directory.dedup import UNSEEN, SeenState, after_fetch, observe
from directory.events import ProfileValue

ALICE = ProfileValue("Alice", None)
DELIA = ProfileValue("Delia", None)


def observe_all(state: SeenState, *seen: tuple[str, ProfileValue]) -> tuple[SeenState, int]:
    fetches = 0
    for room_id, value in seen:
        state, fetch = observe(state, room_id, value)
        fetches += fetch
    return state, fetches


def test_one_value_echoed_into_many_rooms_asks_once() -> None:
    state, fetches = observe_all(UNSEEN, *((f"!r{i}", ALICE) for i in range(500)))
    assert fetches == 1
    assert state.value == ALICE and state.elsewhere


def test_the_same_value_again_in_the_same_room_asks_nothing() -> None:
    state, _ = observe_all(UNSEEN, ("!a", ALICE))
    assert observe(state, "!a", ALICE) == (state, False)


def test_a_new_value_always_asks() -> None:
    state, _ = observe_all(UNSEEN, ("!a", ALICE))
    state, fetch = observe(state, "!a", DELIA)
    assert fetch and state.value == DELIA and state.room_id == "!a"


def test_a_value_found_per_room_is_new_again_from_another_room() -> None:
    state, _ = observe_all(UNSEEN, ("!a", ALICE), ("!p", DELIA))
    state, again = after_fetch(state, ALICE)  # the public name differs: Delia is per-room
    assert not again and state.per_room and state.room_id == "!p"
    assert observe(state, "!p", DELIA) == (state, False)  # same room: still per-room
    state, fetch = observe(state, "!a", DELIA)  # another room: looks global now
    assert fetch and not state.per_room


def test_a_confirmed_value_clears_the_per_room_mark() -> None:
    state, _ = observe_all(UNSEEN, ("!p", DELIA))
    state, _ = after_fetch(state, ALICE)
    state, _ = observe(state, "!a", DELIA)
    state, again = after_fetch(state, DELIA)
    assert not again and not state.per_room
    assert observe(state, "!b", DELIA)[1] is False


def test_an_answer_that_predates_a_global_change_asks_once_more() -> None:
    # Per-room Delia in !p queues a fetch; while it is in flight the user makes Delia
    # global, echoed into !a; the in-flight answer still says Alice.
    state, _ = observe_all(UNSEEN, ("!p", DELIA))
    state, fetch = observe(state, "!a", DELIA)
    assert not fetch and state.elsewhere
    state, again = after_fetch(state, ALICE)
    assert again and not state.per_room
    # The second answer is authoritative, whatever it says.
    assert after_fetch(state, ALICE) == (SeenState(DELIA, "!p", False, True), False)


def test_answers_for_an_unseen_value_change_nothing() -> None:
    assert after_fetch(UNSEEN, ALICE) == (UNSEEN, False)
