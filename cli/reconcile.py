"""`python -m directory reconcile ROOM_ID | --all`: what the scheduled room check does,
now: read the rooms again through the workers and report the repairs."""

from __future__ import annotations

import argparse
import sys
import time

from sqlalchemy import Engine

from cli import CommandError
from cli.common import check_redis, open_database, workers_answering
from directory.clock import now_ms
from directory.config import Settings
from directory.maintenance import RECHECK_LEASE_MS
from directory.snapshots import RECONCILE, REPAIRS_PREFIX
from directory.storage import counters
from directory.storage import rooms as room_store

POLL_SECONDS = 0.5
# Give up waiting when no room has been read for this long (see the worker logs).
STALL_SECONDS = 120.0


def run(args: argparse.Namespace, settings: Settings) -> int:
    engine = open_database(settings)
    check_redis(settings)
    with engine.begin() as conn:
        if args.all:
            targets = room_store.visible_rooms(conn)
        else:
            if args.room_id not in room_store.visible_rooms_among(conn, [args.room_id]):
                raise CommandError(
                    f"{args.room_id} is not a room we can see (none of its members we know is"
                    " local); `python -m directory bootstrap` loads rooms we were never told of"
                )
            targets = [args.room_id]
        started = now_ms()
        # Leased like a scheduled check, so beat does not read them a second time.
        room_store.postpone_recheck(conn, targets, started + RECHECK_LEASE_MS)
        before = counters.read(conn, REPAIRS_PREFIX)
    if not targets:
        print("no room to read: the directory knows no room with a local member")
        return 0

    from tasks.outbox import publish_backfills

    publish_backfills(targets, purpose=RECONCILE, force=True)
    print(f"reading {len(targets):,} room{'s' if len(targets) != 1 else ''} again")
    if args.no_wait:
        return 0
    if not workers_answering():
        print("no worker answers: the rooms are read once one runs", file=sys.stderr)
    unread = _wait(engine, targets, started)
    with engine.connect() as conn:
        after = counters.read(conn, REPAIRS_PREFIX)
    repairs = {
        name[len(REPAIRS_PREFIX) :]: after.get(name, 0) - before.get(name, 0)
        for name in after
        if after.get(name, 0) != before.get(name, 0)
    }
    if repairs:
        print("repaired: " + ", ".join(f"{kind} {n:,}" for kind, n in sorted(repairs.items())))
    else:
        print("nothing to repair")
    if unread:
        print(f"{unread:,} rooms were not read (see the worker logs)", file=sys.stderr)
        return 1
    return 0


def _wait(engine: Engine, targets: list[str], started: int) -> int:
    """Until every target was read after `started` (or left, or found unreadable), or
    nothing moved for a while; returns how many were not read."""
    last_done, last_change = -1, time.monotonic()
    while True:
        with engine.connect() as conn:
            outcome = room_store.recheck_outcomes(
                conn, targets, started, started + RECHECK_LEASE_MS
            )
        done = outcome.read + outcome.gone + outcome.unreadable
        if done == len(targets):
            return outcome.unreadable
        if done != last_done:
            last_done, last_change = done, time.monotonic()
            if len(targets) > 1:
                print(f"  {done:,}/{len(targets):,} rooms read", flush=True)
        elif time.monotonic() - last_change > STALL_SECONDS:
            return len(targets) - outcome.read - outcome.gone
        time.sleep(POLL_SECONDS)
