"""`python -m directory bootstrap`: load every room the homeserver is already in, and
show how it goes (directory/bootstrap.py does the work, in the workers)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TextIO

from sqlalchemy import Engine

from cli import CommandError
from cli.common import check_redis, duration, open_database, when, workers_answering
from directory import bootstrap
from directory.clock import now_ms
from directory.config import Settings
from directory.homeserver import HomeserverClient
from directory.storage import bootstrap as store

# How often the progress is read and drawn; without a terminal, a line this often.
POLL_SECONDS = 0.5
PLAIN_LINE_SECONDS = 5.0
# The rate shown is measured over this many seconds of the CLI's own readings.
RATE_WINDOW_SECONDS = 10.0
BAR_WIDTH = 24
# Without any progress for this long, say that no worker may be running.
IDLE_WARNING_SECONDS = 15.0
FAILED_ROOMS_SHOWN = 10


def run(args: argparse.Namespace, settings: Settings) -> int:
    engine = open_database(settings)
    if args.status:
        return show_status(engine, as_json=args.json)
    users = None
    if args.users_file is not None:
        try:
            lines = args.users_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise CommandError(f"cannot read the users file: {exc}") from exc
        try:
            users = bootstrap.read_users_file(lines, settings.server_name)
        except bootstrap.BootstrapError as exc:
            raise CommandError(str(exc)) from exc
    client = HomeserverClient(settings)
    try:
        source = bootstrap.source_for(settings, users_file=users is not None)
        bootstrap.check_homeserver(client, source)
        check_redis(settings)
        if args.restart:
            abandoned = bootstrap.abandon(engine)
            if abandoned is not None:
                print(f"bootstrap run {abandoned} abandoned")
        run_id, resumed = bootstrap.start(engine, source, users)
    except bootstrap.BootstrapError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        client.close()
    how = "Synapse's admin room list" if source == bootstrap.ADMIN else f"{len(users or ())} users"
    print(f"bootstrap run {run_id} {'resumed' if resumed else 'started'}: rooms from {how}")

    from tasks.outbox import publish_bootstrap

    publish_bootstrap(run_id, lister=True, force=True)
    if args.no_wait:
        print("the workers load it; `python -m directory bootstrap --status` shows where it stands")
        return 0
    if not workers_answering():
        print(
            "no worker answers: the bootstrap starts once one runs (`make run`, or"
            " `python worker.py`)",
            file=sys.stderr,
        )
    try:
        return watch(engine, run_id, sys.stdout)
    except KeyboardInterrupt:
        print(
            "\nthe bootstrap goes on in the workers: run the command again to watch it,"
            " or add --status",
            file=sys.stderr,
        )
        return 130


@dataclass
class Reading:
    at: float
    rooms: int
    memberships: int


class ProgressLine:
    """Rooms, memberships, rate and ETA: redrawn in place on a terminal, one line now
    and then otherwise (CI logs, a pipe)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.readings: deque[Reading] = deque()
        self.last_plain = 0.0
        self.width = 0

    def rate(self, run: store.Run, progress: store.Progress) -> tuple[float, float]:
        """Rooms and memberships per second, over the CLI's recent readings (the run's
        average until there are enough of them)."""
        now = time.monotonic()
        self.readings.append(Reading(now, progress.loaded, progress.memberships))
        while self.readings and now - self.readings[0].at > RATE_WINDOW_SECONDS:
            self.readings.popleft()
        first = self.readings[0]
        if now - first.at < 2.0:
            elapsed = max(0.001, (now_ms() - run.started_at_ms) / 1000)
            return progress.loaded / elapsed, progress.memberships / elapsed
        elapsed = now - first.at
        return (progress.loaded - first.rooms) / elapsed, (
            progress.memberships - first.memberships
        ) / elapsed

    def text(self, run: store.Run, progress: store.Progress) -> str:
        rooms_rate, members_rate = self.rate(run, progress)
        listing = run.listed_at_ms is None
        total = progress.listed
        if listing and run.rooms_reported:
            total = max(total, run.rooms_reported)
        done = progress.loaded + progress.failed
        fraction = done / total if total else (0.0 if listing else 1.0)
        filled = int(BAR_WIDTH * min(1.0, fraction))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        remaining = max(0, total - done)
        eta = f"ETA {duration(remaining / rooms_rate)}" if rooms_rate > 0 else "ETA -"
        parts = [
            f"rooms {done:,}/{total:,}{'+' if listing else ''} [{bar}] {fraction:4.0%}",
            f"memberships {progress.memberships:,}",
            f"{members_rate:,.0f}/s",
            ("~" if listing else "") + eta,
            f"failed {progress.failed:,}",
        ]
        if listing and progress.users_total:
            parts.insert(1, f"users listed {progress.users_listed:,}/{progress.users_total:,}")
        elif listing:
            parts.insert(1, "listing")
        if run.last_error:
            parts.append(f"waiting: {run.last_error[:120]}")
        return " | ".join(parts)

    def draw(self, run: store.Run, progress: store.Progress, final: bool = False) -> None:
        line = self.text(run, progress)
        if self.tty:
            padding = " " * max(0, self.width - len(line))
            self.stream.write("\r" + line + padding + ("\n" if final else ""))
            self.width = len(line)
        elif final or time.monotonic() - self.last_plain >= PLAIN_LINE_SECONDS:
            self.stream.write(line + "\n")
            self.last_plain = time.monotonic()
        self.stream.flush()


def watch(engine: Engine, run_id: int, stream: TextIO) -> int:
    """Draw the run's progress until it finishes; 0 if every room loaded, 1 if some
    failed."""
    view = ProgressLine(stream)
    last_change, last_counts, warned = time.monotonic(), None, False
    while True:
        with engine.connect() as conn:
            run_row = store.get_run(conn, run_id)
            assert run_row is not None
            progress = store.progress(conn, run_id, now_ms())
        finished = run_row.finished_at_ms is not None
        view.draw(run_row, progress, final=finished)
        if finished:
            return _summary(engine, run_row, progress, stream)
        counts = (progress.listed, progress.read, progress.loaded, progress.failed)
        if counts != last_counts:
            last_change, last_counts = time.monotonic(), counts
        elif not warned and time.monotonic() - last_change > IDLE_WARNING_SECONDS:
            warned = True
            if not workers_answering():
                stream.write("\nno progress and no worker answers: is a worker running?\n")
        time.sleep(POLL_SECONDS)


def _summary(engine: Engine, run: store.Run, progress: store.Progress, stream: TextIO) -> int:
    seconds = max(0.001, ((run.finished_at_ms or now_ms()) - run.started_at_ms) / 1000)
    stream.write(
        f"bootstrap run {run.id} finished in {duration(seconds)}: {progress.loaded:,} rooms"
        f" loaded, {progress.memberships:,} memberships ({progress.memberships / seconds:,.0f}/s),"
        f" {progress.failed:,} rooms failed\n"
    )
    if not progress.failed:
        return 0
    with engine.connect() as conn:
        failed = store.failed_rooms(conn, run.id, FAILED_ROOMS_SHOWN)
    for room_id, error in failed:
        stream.write(f"  failed: {room_id}: {error}\n")
    stream.write("run the bootstrap again to retry the failed rooms\n")
    return 1


def show_status(engine: Engine, as_json: bool = False) -> int:
    now = now_ms()
    with engine.connect() as conn:
        run_row = store.latest_run(conn)
        if run_row is None:
            if as_json:
                print(json.dumps({"run": None}))
            else:
                print("no bootstrap has run on this database")
            return 0
        progress = store.progress(conn, run_row.id, now)
        failed = store.failed_rooms(conn, run_row.id, FAILED_ROOMS_SHOWN)
    window = store.RATE_WINDOW_MS / 1000
    rate = progress.recent_memberships / window
    rooms_rate = progress.recent_rooms / window
    state = (
        "finished"
        if run_row.finished_at_ms is not None
        else ("listing" if run_row.listed_at_ms is None else "loading")
    )
    eta = progress.remaining / rooms_rate if rooms_rate and state != "finished" else None
    if as_json:
        print(
            json.dumps(
                {
                    "run": asdict(run_row),
                    "state": state,
                    "progress": asdict(progress),
                    "memberships_per_second": rate,
                    "eta_seconds": eta,
                    "failed_rooms": [{"room_id": r, "error": e} for r, e in failed],
                },
                indent=2,
            )
        )
        return 0
    source = "Synapse's admin room list" if run_row.source == bootstrap.ADMIN else "users file"
    took = duration(((run_row.finished_at_ms or now) - run_row.started_at_ms) / 1000)
    print(f"bootstrap run {run_row.id} ({source}): {state}")
    if run_row.finished_at_ms is None:
        print(f"  started    {when(run_row.started_at_ms)}, running for {took}")
    else:
        print(
            f"  started    {when(run_row.started_at_ms)},"
            f" finished {when(run_row.finished_at_ms)} (took {took})"
        )
    listing = "complete" if run_row.listed_at_ms is not None else "in progress"
    notes = ""
    if run_row.rooms_reported:
        notes += f"; the homeserver reports {run_row.rooms_reported:,} rooms in all"
    if progress.users_total:
        notes += f"; users listed {progress.users_listed:,}/{progress.users_total:,}"
    print(f"  listing    {listing}: {progress.listed:,} rooms with local members{notes}")
    print(
        f"  rooms      {progress.loaded:,} loaded, {progress.waiting:,} waiting,"
        f" {progress.read:,} read (in the inbox), {progress.failed:,} failed"
    )
    print(f"  members    {progress.memberships:,} loaded, {rate:,.0f}/s over the last minute")
    if eta is not None:
        print(f"  ETA        {duration(eta)}")
    if run_row.last_error:
        print(f"  waiting    {run_row.last_error} (since {when(run_row.last_error_at_ms)})")
    for room_id, error in failed:
        print(f"  failed     {room_id}: {error}")
    return 0
