"""Loading a homeserver that already has rooms: the directory knows only what events
told it. A homeserver does not replay the members already in a room, and what it sends
a newly registered appservice of the past depends on its own bookkeeping (a Synapse
that never had an appservice sends the history it still holds; one that had sends
nothing), so only reading the rooms gives their current state.

A run lists every room our homeserver is in, then reads each one and queues its
snapshot in the inbox, where the consumer applies it in order with live events,
through the same hooks (directory/snapshots.py): per-room values stay triggers, and
nothing is wiped, so searches keep working and include rooms as they land.

- Listing: with ADMIN_TOKEN, Synapse's admin room list, page by page (the rooms with
  joined local members); without it, each local user of a list (--users-file) and the
  rooms the appservice, acting as them, finds them joined to.
- Reading: one request per room, its current state (the admin API, or the client API
  as the user the room was listed through).

Everything a run has done is in the database (storage/bootstrap.py): listing resumes
from its cursor, reading from each room's state, so killing the CLI or the workers
loses nothing and finished rooms are not read again. Reading is shared by loader
tasks, at most BOOTSTRAP_CONCURRENCY of them reading at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from directory.clock import now_ms
from directory.config import Settings
from directory.events import is_valid_user_id, server_name_of
from directory.homeserver import (
    HomeserverClient,
    HomeserverDown,
    HomeserverError,
    HomeserverRefused,
    HomeserverUnavailable,
    RateLimited,
    RoomUnreadable,
)
from directory.ingest import accept_snapshots
from directory.snapshots import BOOTSTRAP, SnapshotItem
from directory.storage import bootstrap as store
from directory.storage import rooms as room_store

logger = logging.getLogger(__name__)

ADMIN, USERS = "admin", "users"
# Rooms per page of the admin room list (Synapse's default is 100).
LIST_PAGE_SIZE = 100
# Users whose joined rooms are asked for per listing round.
USERS_PER_ROUND = 50
# Rooms a loader claims at once; each claim hides them from other loaders this long
# (a loader that dies leaves them due again after it).
CLAIM_SIZE = 10
ROOM_LEASE_MS = 120_000
# A room whose read keeps failing (5xx for it alone) is given up after this many
# attempts, waiting 5 s x 4^n between them; running the bootstrap again retries it.
MAX_ROOM_ATTEMPTS = 5
ROOM_RETRY_BASE_MS = 5_000
# Our homeserver refusing our token or not answering: nothing is charged to the rooms;
# the run waits this long and tries again.
HOMESERVER_RETRY_MS = 10_000


class BootstrapError(Exception):
    """Something the operator must fix; the message is one line that says what."""


@dataclass(frozen=True)
class StepResult:
    """What a listing or loading step did, and when the run wants the next one."""

    done: int = 0
    # Nothing is left to do now (the listing is complete, or no room is due).
    finished: bool = False
    # Call again after this many seconds (our homeserver refused, failed or throttled).
    retry_in: float | None = None


def source_for(settings: Settings, users_file: bool) -> str:
    if users_file:
        return USERS
    if settings.admin_token:
        return ADMIN
    raise BootstrapError(
        "bootstrap needs ADMIN_TOKEN (a server admin's access token) to list the rooms,"
        " or --users-file with the local users whose rooms to load"
    )


def check_homeserver(client: HomeserverClient, source: str) -> None:
    """Fail in one clear line if our homeserver cannot be used as configured."""
    try:
        client.whoami()
    except HomeserverRefused as exc:
        raise BootstrapError(f"{exc}: check AS_TOKEN") from exc
    except HomeserverError as exc:
        raise BootstrapError(f"{exc}: check HOMESERVER_URL") from exc
    if source != ADMIN:
        return
    try:
        client.admin_rooms(None, 1)
    except HomeserverRefused as exc:
        raise BootstrapError(f"{exc}: check ADMIN_TOKEN") from exc
    except RoomUnreadable as exc:
        raise BootstrapError(
            f"ADMIN_TOKEN is not a server admin's token ({str(exc).rsplit(': ', 1)[-1]})"
        ) from exc
    except HomeserverError as exc:
        raise BootstrapError(f"the admin room list is not available: {exc}") from exc


def read_users_file(lines: Iterable[str], server_name: str) -> list[str]:
    """Local user ids, one per line (blank lines and # comments skipped), in order."""
    users: list[str] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not is_valid_user_id(line):
            raise BootstrapError(f"line {number} of the users file is not a user id: {line!r:.80}")
        if server_name_of(line) != server_name:
            raise BootstrapError(
                f"line {number} of the users file is not a local user of {server_name}: {line}"
            )
        users.append(line)
    if not users:
        raise BootstrapError("the users file lists no user")
    return list(dict.fromkeys(users))


def start(engine: Engine, source: str, users: list[str] | None = None) -> tuple[int, bool]:
    """The active run, resumed (its failed and waiting rooms due now), or a new one.
    Returns (run id, whether it was resumed)."""
    for _ in range(3):
        try:
            with engine.begin() as conn:
                now = now_ms()
                active = store.active_run(conn)
                if active is not None:
                    if active.source != source:
                        raise BootstrapError(
                            f"bootstrap run {active.id} lists rooms by {active.source!r}, not"
                            f" {source!r}: let it finish, or start anew with --restart"
                        )
                    store.resume(conn, active.id, now)
                    store.record_error(conn, active.id, None, now)
                    return active.id, True
                return store.create_run(conn, source, now, users or ()), False
        except IntegrityError:
            # Another process started a run at the same moment: take that one.
            continue
    raise BootstrapError("could not start a bootstrap run: another one keeps starting")


def abandon(engine: Engine) -> int | None:
    """End the active run where it stands (--restart); returns its id."""
    with engine.begin() as conn:
        active = store.active_run(conn)
        if active is None:
            return None
        store.record_error(conn, active.id, "abandoned by --restart", now_ms())
        store.close_run(conn, active.id, now_ms())
        return active.id


def list_step(
    engine: Engine,
    client: HomeserverClient,
    settings: Settings,
    run_id: int,
    budget_s: float,
    keep_alive: Callable[[], object] = lambda: None,
) -> StepResult:
    """List rooms for `budget_s` at most, saving progress as it goes; `keep_alive` is
    called between pages (the lister extends its lock)."""
    with engine.connect() as conn:
        run = store.get_run(conn, run_id)
    if run is None or run.finished_at_ms is not None or run.listed_at_ms is not None:
        return StepResult(finished=True)
    deadline = time.monotonic() + budget_s
    listed = 0
    try:
        while time.monotonic() < deadline:
            keep_alive()
            if run.source == ADMIN:
                added, complete = _list_admin_page(engine, client, run_id)
            else:
                added, complete = _list_users(engine, client, settings, run_id)
            listed += added
            if complete:
                with engine.begin() as conn:
                    store.listing_done(conn, run_id, now_ms())
                    store.record_error(conn, run_id, None, now_ms())
                    store.finish_if_done(conn, run_id, now_ms())
                return StepResult(done=listed, finished=True)
    except HomeserverError as exc:
        return StepResult(done=listed, retry_in=_wait_for_homeserver(engine, run_id, exc))
    return StepResult(done=listed)


def _list_admin_page(engine: Engine, client: HomeserverClient, run_id: int) -> tuple[int, bool]:
    with engine.connect() as conn:
        run = store.get_run(conn, run_id)
    assert run is not None
    page = client.admin_rooms(run.list_cursor, LIST_PAGE_SIZE)
    rooms = [(room.room_id, None) for room in page.rooms if room.joined_local_members > 0]
    with engine.begin() as conn:
        store.add_rooms(conn, run_id, rooms, now_ms())
        store.save_cursor(conn, run_id, page.next_batch, page.total_rooms)
    return len(rooms), page.next_batch is None


def _list_users(
    engine: Engine, client: HomeserverClient, settings: Settings, run_id: int
) -> tuple[int, bool]:
    with engine.connect() as conn:
        users = store.users_to_list(conn, run_id, USERS_PER_ROUND)
    if not users:
        return 0, True

    def joined(user_id: str) -> tuple[str, list[str] | None, str | None]:
        try:
            return user_id, client.joined_rooms(user_id), None
        except RoomUnreadable as exc:
            # We may not act as this user (not in our namespace, or unknown): noted,
            # and the run goes on with the others.
            return user_id, None, str(exc)

    with ThreadPoolExecutor(max_workers=settings.bootstrap_concurrency) as pool:
        answers = list(pool.map(joined, users))
    rooms = [(room, user) for user, joined_rooms, _ in answers for room in joined_rooms or ()]
    with engine.begin() as conn:
        store.add_rooms(conn, run_id, rooms, now_ms())
        store.users_listed(conn, run_id, {user: error for user, _, error in answers})
    return len({room for room, _ in rooms}), False


def load_step(
    engine: Engine,
    client: HomeserverClient,
    run_id: int,
    budget_s: float,
    wake: Callable[[], object],
    keep_alive: Callable[[], object] = lambda: None,
) -> StepResult:
    """Read due rooms of the run for `budget_s` at most, a claim of CLAIM_SIZE rooms at
    a time: their snapshots are queued in the inbox together, in one transaction, and
    `wake` (the consumer) is called once per claim; `keep_alive` is called between
    rooms (the loader extends its slot)."""
    deadline = time.monotonic() + budget_s
    read = 0
    while time.monotonic() < deadline:
        now = now_ms()
        with engine.begin() as conn:
            run = store.get_run(conn, run_id)
            if run is None or run.finished_at_ms is not None:
                return StepResult(done=read, finished=True)
            claimed = store.claim_rooms(conn, run_id, now, now + ROOM_LEASE_MS, CLAIM_SIZE)
            # Noted before the reads: events applied after make a snapshot stale.
            read_after = room_store.member_event_counters(conn, [r.room_id for r in claimed])
        if not claimed:
            with engine.begin() as conn:
                store.finish_if_done(conn, run_id, now_ms())
            return StepResult(done=read, finished=True)
        claim = _read_claim(client, run_id, claimed, read_after, keep_alive)
        wait_s = (
            None
            if claim.stopped_by is None
            else _wait_for_homeserver(engine, run_id, claim.stopped_by)
        )
        with engine.begin() as conn:
            accept_snapshots(conn, claim.items)
            store.rooms_read(conn, run_id, [item.room_id for item in claim.items], now_ms())
            for room, error in claim.failed:
                attempts = room.attempts + 1
                retry_at = None
                if isinstance(error, HomeserverUnavailable) and attempts < MAX_ROOM_ATTEMPTS:
                    retry_at = now_ms() + ROOM_RETRY_BASE_MS * 4 ** (attempts - 1)
                store.room_attempt_failed(
                    conn, run_id, room.room_id, attempts, retry_at, str(error), now_ms()
                )
            if claim.failed:
                store.finish_if_done(conn, run_id, now_ms())
            if claim.untried:
                # Ours, not the rooms': they wait, none is charged.
                store.postpone_rooms(
                    conn,
                    run_id,
                    [room.room_id for room in claim.untried],
                    now_ms() + int((wait_s or 0) * 1000),
                    str(claim.stopped_by)[:500],
                )
            elif claim.items and run.last_error is not None:
                # The homeserver answers again: the run no longer waits for it.
                store.record_error(conn, run_id, None, now_ms())
        if claim.items:
            read += len(claim.items)
            wake()
        if wait_s is not None:
            return StepResult(done=read, retry_in=wait_s)
    return StepResult(done=read)


@dataclass
class _Claim:
    items: list[SnapshotItem]
    failed: list[tuple[store.RoomToRead, HomeserverError]]
    # Not read because our homeserver stopped answering (stopped_by says how).
    untried: list[store.RoomToRead]
    stopped_by: HomeserverError | None


def _read_claim(
    client: HomeserverClient,
    run_id: int,
    claimed: list[store.RoomToRead],
    read_after: dict[str, int],
    keep_alive: Callable[[], object],
) -> _Claim:
    claim = _Claim([], [], [], None)
    for index, room in enumerate(claimed):
        keep_alive()
        try:
            if room.read_as is None:
                snapshot = client.admin_room_state(room.room_id)
            else:
                snapshot = client.room_state(room.room_id, room.read_as)
        except (HomeserverRefused, HomeserverDown, RateLimited) as exc:
            claim.untried, claim.stopped_by = claimed[index:], exc
            return claim
        except (RoomUnreadable, HomeserverUnavailable) as exc:
            logger.info("bootstrap: could not read %s (%s)", room.room_id, exc)
            claim.failed.append((room, exc))
            continue
        claim.items.append(
            SnapshotItem(
                room.room_id, BOOTSTRAP, read_after.get(room.room_id), snapshot, run_id=run_id
            )
        )
    return claim


def _wait_for_homeserver(engine: Engine, run_id: int, exc: HomeserverError) -> float:
    """Record why the run waits (the CLI and --status show it); seconds to wait."""
    if isinstance(exc, RateLimited):
        return max(exc.retry_after, 0.1)
    logger.warning("bootstrap run %d waits for our homeserver: %s", run_id, exc)
    with engine.begin() as conn:
        store.record_error(conn, run_id, str(exc)[:500], now_ms())
    return HOMESERVER_RETRY_MS / 1000
