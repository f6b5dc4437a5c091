"""`python -m directory requeue | refresh | forget`: acting on one user's (or one
server's) fetches, and erasing a user. The database changes commit first; the fetch
runs are published after (directory/operator.py does the work)."""

from __future__ import annotations

import argparse
import re

from cli import CommandError
from cli.common import check_redis, duration, open_database
from directory import operator
from directory.clock import now_ms
from directory.config import Settings
from directory.events import MAX_ID_LENGTH, is_valid_user_id, server_name_of
from directory.membership import BatchOutcome
from directory.storage import entries, pending
from directory.text import has_control_characters

_SERVER_NAME = re.compile(r"^[^\s/@]+$")


def valid_user_id(raw: str) -> str:
    if not is_valid_user_id(raw):
        raise CommandError(f"not a valid user id: {raw!r:.80} (expected @localpart:server)")
    return raw


def _valid_server_name(raw: str) -> str:
    if len(raw) > MAX_ID_LENGTH or not _SERVER_NAME.match(raw) or has_control_characters(raw):
        raise CommandError(f"not a valid server name: {raw!r:.80}")
    return raw


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _users(n: int) -> str:
    return _count(n, "user")


def _backoff_note(server: str, seconds_left: float) -> str:
    return (
        f"{server} is backed off for {duration(seconds_left)} more: its users wait for it"
        f" (`python -m directory requeue --server {server}` clears it)"
    )


def _publish_fetches(due: dict[str, int]) -> None:
    if not due:
        return
    from tasks.outbox import publish_fetches

    publish_fetches(sorted(due), due, force=True)


def run_requeue(args: argparse.Namespace, settings: Settings) -> int:
    user_id = valid_user_id(args.user_id) if args.user_id else None
    server = _valid_server_name(args.server) if args.server is not None else None
    engine = open_database(settings)
    check_redis(settings)
    with engine.begin() as conn:
        if user_id is not None and pending.pending_of(conn, user_id) is None:
            if entries.public_entry(conn, user_id) is None:
                raise CommandError(f"{user_id} is unknown: no entry, no pending fetch", status=1)
            raise CommandError(
                f"{user_id} has no pending fetch;"
                f" `python -m directory refresh {user_id}` queues a fresh one",
                status=1,
            )
        done = operator.requeue(
            conn, now_ms(), user_id=user_id, server_name=server, given_up=args.given_up
        )
    _publish_fetches(dict(done.due_by_server))

    became = sum(done.became_due.values())
    line = f"{_users(became)} became due now"
    if done.rows > became:
        already = done.rows - became
        line += (
            f" ({already:,} {'was' if already == 1 else 'were'} due already; attempts start over)"
        )
    if server is not None and done.backoff_cleared:
        line += f"; the backoff of {server} is cleared"
    print(line)
    if server is not None and not done.rows and not done.backoff_cleared:
        print(f"nothing was pending for {server}, and it was not backed off")
    for backed_off, seconds_left in done.still_backed_off.items():
        print(_backoff_note(backed_off, seconds_left))
    return 0


def run_refresh(args: argparse.Namespace, settings: Settings) -> int:
    user_id = valid_user_id(args.user_id)
    server = server_name_of(user_id)
    engine = open_database(settings)
    check_redis(settings)
    now = now_ms()
    with engine.begin() as conn:
        if not operator.refresh(conn, user_id, now):
            raise CommandError(
                f"{user_id} has no entry, so nothing to refresh"
                f" (`python -m directory explain {user_id}` says why)",
                status=1,
            )
        seconds_left = operator.backoff_left(conn, server, now)
    _publish_fetches({server: 1})
    print(f"{user_id}: a fresh fetch of their public profile is due now")
    if seconds_left is not None:
        print(_backoff_note(server, seconds_left))
    return 0


def _publish_outcome(outcome: BatchOutcome) -> None:
    if not (
        outcome.fetch_servers
        or outcome.rooms_to_backfill
        or outcome.snapshots_to_retry
        or outcome.bootstrap_runs
    ):
        return
    from tasks.outbox import publish_outcome

    publish_outcome(outcome)


def run_forget(args: argparse.Namespace, settings: Settings) -> int:
    user_id = valid_user_id(args.user_id)
    engine = open_database(settings)
    with engine.begin() as conn:
        gone = operator.forget(conn, settings, user_id, now_ms())
    if gone is None:
        raise CommandError(f"{user_id} is unknown: nothing is held for them", status=1)
    _publish_outcome(gone.outcome)

    print(
        f"forgot {user_id}: entry {gone.entry}, pending fetch {gone.pending_fetch},"
        f" memberships {gone.memberships:,} ({gone.per_room_values:,} with a per-room name"
        " or avatar)"
    )
    if gone.rooms_no_longer_visible or gone.other_entries_removed:
        rooms_gone = gone.rooms_no_longer_visible
        print(
            f"  with them: {_count(rooms_gone, 'room')} no longer visible (they were"
            f" {'its' if rooms_gone == 1 else 'their'} last local member),"
            f" {_count(gone.other_entries_removed, 'other entry', 'other entries')} removed"
        )
    if gone.other_rows:
        rows = _count(gone.other_rows, "room or bootstrap row")
        print(f"  {rows} no longer {'names' if gone.other_rows == 1 else 'name'} them")
    rooms = f" ({', '.join(gone.rooms[:5])}{', ...' if len(gone.rooms) > 5 else ''})"
    print(
        f"they are still in the rooms they were in{rooms if gone.rooms else ''}: events still"
        " arriving for those rooms, or a room's scheduled check, will bring them back as a"
        " new user (a placeholder and a fresh fetch)"
    )
    if gone.inbox_events:
        print(
            f"the inbox holds {gone.inbox_events:,} events not applied yet: any of theirs"
            " brings them back too"
        )
    return 0
