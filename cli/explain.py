"""`python -m directory explain USER_ID`: why a user is or is not listed, and who can
find them. Only the public profile a fetch brought is ever shown: never a per-room
name or avatar (directory/operator.py does not read them)."""

from __future__ import annotations

import argparse

from cli import CommandError
from cli.common import duration, open_database, when
from cli.users import valid_user_id
from directory import operator
from directory.clock import now_ms
from directory.config import Settings
from directory.storage import pending

# A bridge's puppet may be in thousands of rooms: these many are listed.
ROOMS_SHOWN = 50
PUBLIC_ROOMS_NAMED = 5


def run(args: argparse.Namespace, settings: Settings) -> int:
    user_id = valid_user_id(args.user_id)
    engine = open_database(settings)
    with engine.connect() as conn:
        found = operator.explain(conn, settings, user_id, now_ms())
    if not found.known:
        raise CommandError(
            f"{user_id} is unknown: no entry, no pending fetch, in no room we know", status=1
        )
    print("\n".join(lines(found)))
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _listing(found: operator.Explanation) -> str:
    entry = found.entry
    visible = found.visible_rooms
    if entry is None:
        if visible:
            return (
                f"no, although in {_plural(len(visible), 'room')} we can see: the next event"
                " or room check adds them"
            )
        if found.rooms:
            return (
                f"no: none of their {_plural(len(found.rooms), 'room')} is one we can see"
                " (no local member in it)"
            )
        return "no: in no room we know"
    if not entry.listed:
        # The entry stays: their memberships still decide who shares a room.
        return "no: held, but never returned by search (see unlisted)"
    how = (
        "yes, as a placeholder (the user id only, until their public profile is fetched)"
        if entry.is_placeholder
        else f"yes, with their public profile (fetched {when(entry.fetched_at_ms)})"
    )
    if not visible:
        how += "; but in no room we can see: the prune removes the entry"
    return how


def _strangers(found: operator.Explanation) -> str:
    entry = found.entry
    public = [room.room_id for room in found.public_rooms][:PUBLIC_ROOMS_NAMED]
    if len(found.public_rooms) > len(public):
        public.append(f"and {len(found.public_rooms) - len(public):,} more")
    if entry is None or not entry.listed:
        return "cannot find them (not listed)"
    if found.search_all_users:
        return "can find them: SEARCH_ALL_USERS is on"
    if entry.in_public_room:
        text = "can find them: in a public or world-readable room we can see"
        text += f" ({', '.join(public)})" if public else ""
        if not public:
            text += " (so the entry says; none of their rooms is now: a repair is due)"
        return text
    text = "cannot find them: none of their rooms we can see is public or world-readable"
    if public:
        text += f" (yet {', '.join(public)} is: a repair is due)"
    return text


def _room_mates(found: operator.Explanation) -> str:
    visible = found.visible_rooms
    if found.entry is None or not found.entry.listed:
        return "cannot find them (not listed)"
    if not visible:
        return "none: they share no room we can see with anyone"
    return f"members of their {_plural(len(visible), 'visible room')} can find them"


def _pending(view: operator.PendingView | None) -> str:
    if view is None:
        return "none"
    attempts = _plural(view.attempts, "failed attempt")
    if view.state == pending.GIVEN_UP:
        text = f"given up after {attempts} (until the next trigger, a refresh or a requeue)"
    elif view.state == pending.DUE:
        text = f"due since {when(view.next_attempt_ms)}, {attempts}"
    elif view.state == pending.IN_FLIGHT:
        text = f"in flight (claimed by a fetch run until {when(view.next_attempt_ms)}), {attempts}"
    else:
        text = f"waiting until {when(view.next_attempt_ms)}, {attempts}"
    text += f"; queued {when(view.queued_at_ms)} ({view.reason}, generation {view.generation})"
    if view.last_error:
        text += f"; last error: {view.last_error}"
    return text


def _destination(view: operator.DestinationView) -> str:
    if view.backoff_seconds_left is not None:
        text = (
            f"{view.server_name}: backed off for {duration(view.backoff_seconds_left)} more,"
            f" after {_plural(view.consecutive_failures, 'failure')} in a row"
        )
    elif view.consecutive_failures:
        text = (
            f"{view.server_name}: {_plural(view.consecutive_failures, 'failure')} in a row"
            " (not backed off)"
        )
    else:
        text = f"{view.server_name}: healthy"
    if view.consecutive_failures and view.last_error:
        text += f"; last error: {view.last_error}"
    if view.last_success_ms is not None:
        text += f"; last success {when(view.last_success_ms)}"
    return text


def lines(found: operator.Explanation) -> list[str]:
    entry = found.entry
    out = [f"{found.user_id} ({'local' if found.is_local else 'remote'} user)"]
    out.append(f"  listed        {_listing(found)}")
    if found.unlisted is not None:
        out.append(f"  unlisted      {found.unlisted}")
    if found.rules_now is not None:
        now = found.rules_now or "listed"
        out.append(f"  rules now     {now} (applied by the next listing sweep)")
    if entry is not None and not entry.is_placeholder:
        out.append(f"  display name  {entry.display_name or '(none in their public profile)'}")
        out.append(f"  avatar        {entry.avatar_url or '(none in their public profile)'}")
    visible = len(found.visible_rooms)
    out.append(f"  rooms         {len(found.rooms):,} ({visible:,} visible)")
    # Visible rooms first: they are what makes the user findable.
    shown = sorted(found.rooms, key=lambda room: not room.is_visible)[:ROOMS_SHOWN]
    width = max((len(room.room_id) for room in shown), default=0)
    for room in sorted(shown, key=lambda room: room.room_id):
        out.append(
            f"    {room.room_id:<{width}}  {'public ' if room.is_public else 'private'}"
            f"  {'visible' if room.is_visible else 'not visible (no local member)'}"
        )
    if len(found.rooms) > len(shown):
        out.append(f"    ... and {len(found.rooms) - len(shown):,} more")
    out.append(f"  strangers     {_strangers(found)}")
    out.append(f"  room mates    {_room_mates(found)}")
    if entry is None:
        fetch = "-"
    elif entry.is_placeholder:
        fetch = "never (a placeholder)"
    else:
        fetch = f"{when(entry.fetched_at_ms)} (generation {entry.fetched_generation})"
    out.append(f"  last fetch    {fetch}")
    out.append(f"  pending       {_pending(found.pending)}")
    out.append(f"  destination   {_destination(found.destination)}")
    return out
