"""What the operator's commands ask of the directory (cli/ prints it and publishes the
work; this module only reads and writes the database, in the caller's transaction).

- status: the state of the whole directory at a glance.
- explain: why one user is or is not listed, and who can find them. It reads the
  entry's public columns only: never a per-room value (room_members' names and
  avatars, the entry's seen_* columns), so none can be printed.
- requeue / refresh: make pending work due now, or queue a fresh fetch.
- forget: an erasure request. Everything held for the user goes, per-room values
  included, through the same hooks as a leave from each of their rooms, under the
  inbox consumer's lock (the one writer of memberships).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import Connection

from directory import listing
from directory.config import Settings
from directory.events import server_name_of
from directory.membership import BatchOutcome, process_events
from directory.snapshots import REPAIRS_PREFIX
from directory.storage import bootstrap as bootstrap_store
from directory.storage import counters, destinations, entries, inbox, pending
from directory.storage import rooms as room_store
from directory.storage.entries import PublicEntry
from directory.storage.rooms import MemberRoom

# Destinations in backoff that `status` lists (the worst first).
BACKOFFS_SHOWN = 10


def _age_seconds(now_ms: int, at_ms: int | None) -> float | None:
    return None if at_ms is None else max(0.0, (now_ms - at_ms) / 1000)


def _lease_ms(settings: Settings) -> int:
    return int(settings.fetch_lease_seconds * 1000)


# -- status -----------------------------------------------------------------------


@dataclass(frozen=True)
class PendingStatus:
    due: int
    # Claimed by a fetch run (leased): see storage.pending.state_of.
    in_flight: int
    waiting: int
    given_up: int
    # Due rows whose destination is backed off (they wait for it, not for a worker).
    due_behind_backoff: int
    # How long the longest-due fetch has been due (None: nothing is due).
    oldest_due_age_seconds: float | None


@dataclass(frozen=True)
class InboxStatus:
    events: int
    transactions: int
    oldest_age_seconds: float | None


@dataclass(frozen=True)
class BackoffStatus:
    server_name: str
    consecutive_failures: int
    seconds_left: float
    pending_users: int
    last_error: str | None


@dataclass(frozen=True)
class BootstrapStatus:
    run_id: int
    source: str
    state: str  # "listing", "loading" or "finished"
    started_at_ms: int
    finished_at_ms: int | None
    # listed (all so far), waiting, read (in the inbox), loaded, failed
    rooms: dict[str, int]
    memberships: int
    last_error: str | None


@dataclass(frozen=True)
class ReconcileStatus:
    recheck_seconds: float
    visible_rooms: int
    # Visible rooms a snapshot confirmed within the last recheck_seconds, and never.
    checked_recently: int
    never_checked: int
    oldest_check_age_seconds: float | None
    # Repairs so far, by kind (members_added, members_removed, join_rule, ...).
    repairs: dict[str, int]


@dataclass(frozen=True)
class Status:
    at_ms: int
    entries: int
    visible_rooms: int
    pending_fetches: PendingStatus
    inbox: InboxStatus
    backed_off_destinations: int
    worst_backoffs: list[BackoffStatus]
    bootstrap: BootstrapStatus | None
    reconciliation: ReconcileStatus


def status(conn: Connection, settings: Settings, now_ms: int) -> Status:
    counts = pending.state_counts(conn, now_ms, _lease_ms(settings))
    backlog = inbox.backlog(conn)
    backed_off, worst = destinations.worst_backed_off(conn, now_ms, BACKOFFS_SHOWN)
    waiting_users = pending.users_by_server(conn, [d.server_name for d in worst])
    recheck_ms = int(settings.room_recheck_seconds * 1000)
    checks = room_store.check_progress(conn, now_ms - recheck_ms)
    repairs = {
        name[len(REPAIRS_PREFIX) :]: value
        for name, value in sorted(counters.read(conn, REPAIRS_PREFIX).items())
    }
    return Status(
        at_ms=now_ms,
        entries=entries.count(conn),
        visible_rooms=checks.visible,
        pending_fetches=PendingStatus(
            due=counts.due,
            in_flight=counts.in_flight,
            waiting=counts.waiting,
            given_up=counts.given_up,
            due_behind_backoff=counts.due_behind_backoff,
            oldest_due_age_seconds=_age_seconds(now_ms, counts.oldest_due_ms),
        ),
        inbox=InboxStatus(
            events=backlog.events,
            transactions=backlog.transactions,
            oldest_age_seconds=_age_seconds(now_ms, backlog.oldest_ms),
        ),
        backed_off_destinations=backed_off,
        worst_backoffs=[
            BackoffStatus(
                server_name=d.server_name,
                consecutive_failures=d.consecutive_failures,
                seconds_left=max(0.0, ((d.retry_after_ms or now_ms) - now_ms) / 1000),
                pending_users=waiting_users.get(d.server_name, 0),
                last_error=d.last_error,
            )
            for d in worst
        ],
        bootstrap=_bootstrap_status(conn, now_ms),
        reconciliation=ReconcileStatus(
            recheck_seconds=settings.room_recheck_seconds,
            visible_rooms=checks.visible,
            checked_recently=checks.checked_since,
            never_checked=checks.never_checked,
            oldest_check_age_seconds=_age_seconds(now_ms, checks.oldest_checked_at_ms),
            repairs=repairs,
        ),
    )


def _bootstrap_status(conn: Connection, now_ms: int) -> BootstrapStatus | None:
    run = bootstrap_store.latest_run(conn)
    if run is None:
        return None
    progress = bootstrap_store.progress(conn, run.id, now_ms)
    if run.finished_at_ms is not None:
        state = "finished"
    else:
        state = "listing" if run.listed_at_ms is None else "loading"
    return BootstrapStatus(
        run_id=run.id,
        source=run.source,
        state=state,
        started_at_ms=run.started_at_ms,
        finished_at_ms=run.finished_at_ms,
        rooms={
            "listed": progress.listed,
            "waiting": progress.waiting,
            "read": progress.read,
            "loaded": progress.loaded,
            "failed": progress.failed,
        },
        memberships=progress.memberships,
        last_error=run.last_error,
    )


# -- explain ----------------------------------------------------------------------


@dataclass(frozen=True)
class PendingView:
    state: str  # storage.pending: "due", "in flight", "waiting" or "given up"
    attempts: int
    next_attempt_ms: int | None
    reason: str
    last_error: str | None
    generation: int
    queued_at_ms: int


@dataclass(frozen=True)
class DestinationView:
    server_name: str
    consecutive_failures: int
    # Seconds of backoff left (None: not backed off).
    backoff_seconds_left: float | None
    last_success_ms: int | None
    last_failure_ms: int | None
    last_error: str | None


@dataclass(frozen=True)
class Explanation:
    user_id: str
    is_local: bool
    entry: PublicEntry | None
    rooms: list[MemberRoom]
    pending: PendingView | None
    destination: DestinationView
    search_all_users: bool
    # Why search never returns the entry, in words (None: it is listed, or no entry).
    unlisted: str | None = None
    # The current rules judge the entry otherwise than it is stored: their reason in
    # words ("" for listed); the next sweep (a worker's start, beat) writes it.
    rules_now: str | None = None

    @property
    def known(self) -> bool:
        return self.entry is not None or bool(self.rooms) or self.pending is not None

    @property
    def visible_rooms(self) -> list[MemberRoom]:
        return [room for room in self.rooms if room.is_visible]

    @property
    def public_rooms(self) -> list[MemberRoom]:
        """Visible rooms whose members anyone may find (public or world-readable)."""
        return [room for room in self.visible_rooms if room.is_public]

    @property
    def strangers_can_find(self) -> bool:
        """As the search decides: a listed entry's in_public_room flag, or
        SEARCH_ALL_USERS."""
        return (
            self.entry is not None
            and self.entry.listed
            and (self.search_all_users or self.entry.in_public_room)
        )

    @property
    def room_mates_can_find(self) -> bool:
        return self.entry is not None and self.entry.listed and bool(self.visible_rooms)


def explain(conn: Connection, settings: Settings, user_id: str, now_ms: int) -> Explanation:
    server = server_name_of(user_id)
    row = pending.pending_of(conn, user_id)
    pending_view = None
    if row is not None:
        pending_view = PendingView(
            state=pending.state_of(row.next_attempt_ms, now_ms, _lease_ms(settings)),
            attempts=row.attempts,
            next_attempt_ms=row.next_attempt_ms,
            reason=row.reason,
            last_error=row.last_error,
            generation=row.generation,
            queued_at_ms=row.queued_at_ms,
        )
    health = destinations.details(conn, server)
    backoff_left = None
    if health is not None and health.retry_after_ms is not None and health.retry_after_ms > now_ms:
        backoff_left = (health.retry_after_ms - now_ms) / 1000
    entry = entries.public_entry(conn, user_id)
    unlisted = rules_now = None
    if entry is not None:
        rules = listing.rules_for(settings)
        facts = (entry.profile_visibility, entry.account_status)
        if entry.unlisted_reason is not None:
            unlisted = listing.describe(rules, user_id, entry.unlisted_reason, *facts)
        now_reason = rules.reason(user_id, *facts)
        if now_reason != entry.unlisted_reason:
            rules_now = (
                "" if now_reason is None else listing.describe(rules, user_id, now_reason, *facts)
            )
    return Explanation(
        user_id=user_id,
        is_local=server == settings.server_name,
        entry=entry,
        unlisted=unlisted,
        rules_now=rules_now,
        rooms=room_store.rooms_of_member(conn, user_id),
        pending=pending_view,
        destination=DestinationView(
            server_name=server,
            consecutive_failures=health.consecutive_failures if health else 0,
            backoff_seconds_left=backoff_left,
            last_success_ms=health.last_success_ms if health else None,
            last_failure_ms=health.last_failure_ms if health else None,
            last_error=health.last_error if health else None,
        ),
        search_all_users=settings.search_all_users,
    )


def backoff_left(conn: Connection, server_name: str, now_ms: int) -> float | None:
    """Seconds the destination stays backed off (None: it is not)."""
    until = destinations.health(conn, server_name).retry_after_ms
    return None if until is None or until <= now_ms else (until - now_ms) / 1000


# -- requeue and refresh ----------------------------------------------------------


@dataclass(frozen=True)
class Requeued:
    # Pending rows made due now (with a fresh attempt budget).
    rows: int
    # Per destination, the rows that were not due before.
    became_due: Counter[str]
    # Per destination of those rows: rows now due there (what runs are published for).
    due_by_server: Counter[str]
    backoff_cleared: bool = False
    # Destinations of these rows still backed off, with the seconds left.
    still_backed_off: dict[str, float] = field(default_factory=dict)


def requeue(
    conn: Connection,
    now_ms: int,
    *,
    user_id: str | None = None,
    server_name: str | None = None,
    given_up: bool = False,
) -> Requeued:
    """The chosen pending rows are due now with a fresh attempt budget; for a
    destination, its backoff is cleared too."""
    cleared = False
    if server_name is not None:
        cleared = destinations.clear_backoff(conn, server_name)
    servers, became_due = pending.make_due(
        conn, now_ms, user_id=user_id, server_name=server_name, given_up_only=given_up
    )
    waiting = {
        server: left
        for server in sorted(servers)
        if (left := backoff_left(conn, server, now_ms)) is not None
    }
    return Requeued(sum(servers.values()), became_due, servers, cleared, waiting)


def refresh(conn: Connection, user_id: str, now_ms: int) -> bool:
    """Queue a fresh fetch of the user's public profile, due now (a new generation and
    attempt budget). False if the user has no entry."""
    if not entries.lock_entry(conn, user_id):
        return False
    pending.queue(conn, [user_id], "refresh", now_ms)
    return True


# -- forget -----------------------------------------------------------------------


@dataclass
class Forgotten:
    entry: int
    pending_fetch: int
    memberships: int
    # Of those memberships, the ones that held a per-room name or avatar.
    per_room_values: int
    # The rooms they were joined to: events from them (or their scheduled check) bring
    # the user back, as a new user.
    rooms: list[str]
    # Rooms we can no longer see (the user was their last local member we knew), and
    # the entries of other users that went with them.
    rooms_no_longer_visible: int
    other_entries_removed: int
    # Rows of rooms and bootstrap runs that named the user as who to read a room as
    # (another local member reads it now) or listed them.
    other_rows: int
    # Events accepted and not applied yet: any of theirs brings them back too.
    inbox_events: int
    outcome: BatchOutcome


def _leave(room_id: str, user_id: str) -> dict[str, object]:
    return {
        "type": "m.room.member",
        "room_id": room_id,
        "state_key": user_id,
        "sender": user_id,
        "content": {"membership": "leave"},
    }


def forget(conn: Connection, settings: Settings, user_id: str, now_ms: int) -> Forgotten | None:
    """Erase everything held for the user: their entry (public profile and the per-room
    values its dedup state remembers), their pending fetch, their memberships with their
    per-room values, and any mention in rooms and bootstrap runs. None if nothing is
    held. The caller publishes `outcome` after commit.

    Memberships are removed as a leave from each room through the event hooks, in the
    inbox consumer's lock: rooms that lose their last local member stop being visible,
    other entries follow, and a room snapshot read before this is refused and read
    again. The user is still in those rooms: seen again, they are a new user (a
    placeholder and a fetch)."""
    inbox.lock_consumer(conn)
    # Entries are created and deleted only under the lock we hold: no need to lock them.
    had_entry = entries.public_entry(conn, user_id) is not None
    had_pending = pending.pending_of(conn, user_id) is not None
    member_rooms = room_store.rooms_of_member(conn, user_id)
    if not (had_entry or had_pending or member_rooms):
        return None
    per_room = room_store.count_per_room_values(conn, user_id)
    visible_before = {room.room_id for room in member_rooms if room.is_visible}
    outcome = process_events(
        conn,
        [_leave(room.room_id, user_id) for room in member_rooms],
        server_name=settings.server_name,
        now_ms=now_ms,
        profile_max_age_seconds=settings.profile_max_age_seconds,
    )
    # An entry left in no room (the prune's work) goes too, with its pending row.
    own_entry_left = entries.public_entry(conn, user_id) is not None
    entries.delete_entries(conn, [user_id])
    still_visible = room_store.visible_rooms_among(conn, visible_before)
    other_rows = room_store.replace_reader(conn, user_id)
    other_rows += bootstrap_store.forget_user(conn, user_id)
    own_deleted_by_hooks = 1 if had_entry and not own_entry_left else 0
    return Forgotten(
        entry=1 if had_entry else 0,
        pending_fetch=1 if had_pending else 0,
        memberships=len(member_rooms),
        per_room_values=per_room,
        rooms=[room.room_id for room in member_rooms],
        rooms_no_longer_visible=len(visible_before - still_visible),
        other_entries_removed=max(0, outcome.deleted - own_deleted_by_hooks),
        other_rows=other_rows,
        inbox_events=inbox.backlog(conn).events,
        outcome=outcome,
    )
