"""SQL for the pending-fetch table: the outbox of profile lookups.

A row is due when next_attempt_ms <= now. Claiming moves next_attempt_ms forward by a
lease, which hides the row from other workers; a worker that dies leaves the row due
again when the lease ends. NULL means we gave up until the next trigger or refresh.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, delete, func, or_, select, text, tuple_, update

from directory.events import server_name_of
from directory.models import destinations, pending_fetches, sequences
from directory.storage.common import (
    any_of,
    chunks,
    id_batches,
    insert_for,
    is_postgresql,
    upsert_rows,
)

p = pending_fetches.c


@dataclass(frozen=True)
class Claim:
    user_id: str
    server_name: str
    generation: int
    attempts: int


# The counter generations come from (a sequence on PostgreSQL, a row of `sequences`
# on SQLite; migration 0005 created both).
GENERATION_SEQUENCE = "pending_fetch_generation"


def allocate_generations(conn: Connection, count: int) -> list[int]:
    """`count` new generations, increasing, never handed out before (even for rows
    deleted since): a user who leaves and comes back must not get the generation a
    fetch still in flight holds."""
    if count <= 0:
        return []
    if is_postgresql(conn):
        return list(
            conn.scalars(
                text(f"SELECT nextval('{GENERATION_SEQUENCE}') FROM generate_series(1, :n)"),
                {"n": count},
            )
        )
    # SQLite: the caller's write transaction holds the database's only write lock, so
    # reading and bumping the row cannot interleave with another writer.
    stmt = insert_for(conn, sequences).values(name=GENERATION_SEQUENCE, value=count)
    last = conn.scalar(
        stmt.on_conflict_do_update(
            index_elements=["name"], set_={"value": sequences.c.value + count}
        ).returning(sequences.c.value)
    )
    return list(range(last - count + 1, last + 1))


def queue(conn: Connection, user_ids: Collection[str], reason: str, now_ms: int) -> None:
    """Ask for a fetch of each user now. Each gets a new generation (so a fetch in
    flight does not clear the row) and a fresh attempt budget."""
    users = sorted(user_ids)
    generations = allocate_generations(conn, len(users))
    upsert_rows(
        conn,
        pending_fetches,
        (
            "user_id",
            "server_name",
            "generation",
            "attempts",
            "next_attempt_ms",
            "reason",
            "queued_at_ms",
        ),
        [
            (user_id, server_name_of(user_id), generation, 0, now_ms, reason, now_ms)
            for user_id, generation in zip(users, generations, strict=True)
        ],
        conflict=("user_id",),
        update=("generation", "next_attempt_ms", "reason", "queued_at_ms"),
        also_set={"attempts": 0, "last_error": None},
    )


def current_generations(conn: Connection, user_ids: Collection[str]) -> dict[str, int]:
    """The pending generation of each of these users that has a pending row."""
    found: dict[str, int] = {}
    for batch in chunks(sorted(user_ids)):
        rows = conn.execute(select(p.user_id, p.generation).where(any_of(conn, p.user_id, batch)))
        found.update((user_id, int(generation)) for user_id, generation in rows)
    return found


def claim(
    conn: Connection, server_name: str, now_ms: int, lease_until_ms: int, limit: int
) -> list[Claim]:
    """Take up to `limit` due users of one destination, oldest first, for this worker;
    returned in user id order (RETURNING has none of its own)."""
    due = (
        select(p.user_id)
        .where(p.server_name == server_name, p.next_attempt_ms <= now_ms)
        .order_by(p.next_attempt_ms)
        .limit(limit)
    )
    if is_postgresql(conn):
        # Two workers claiming at once take different rows instead of queueing.
        due = due.with_for_update(skip_locked=True)
    # A CTE runs once: inside an IN (...) the planner may re-run the limited subquery
    # for every candidate row, and the claim then takes far more than `limit`.
    taken = due.cte("taken")
    rows = conn.execute(
        update(pending_fetches)
        .where(p.user_id == taken.c.user_id)
        .values(next_attempt_ms=lease_until_ms)
        .returning(p.user_id, p.server_name, p.generation, p.attempts)
    )
    return sorted((Claim(*row) for row in rows), key=lambda claim: claim.user_id)


def complete(conn: Connection, claims: Collection[Claim]) -> None:
    """Done with these generations, in one statement. A row whose generation moved on
    (a newer trigger arrived meanwhile) stays, due, for one more fetch."""
    for batch in chunks(sorted(claims, key=lambda c: c.user_id)):
        conn.execute(
            delete(pending_fetches).where(
                tuple_(p.user_id, p.generation).in_([(c.user_id, c.generation) for c in batch])
            )
        )


@dataclass(frozen=True)
class Failure:
    claim: Claim
    # None gives up until the next trigger or refresh.
    next_attempt_ms: int | None
    error: str


def record_failures(conn: Connection, failures: Collection[Failure]) -> None:
    """Count a failed attempt of each. A newer generation is left alone: its trigger
    came after this attempt and deserves its own."""
    rows = [
        {
            "uid": f.claim.user_id,
            "gen": f.claim.generation,
            "attempts": f.claim.attempts + 1,
            "next_attempt_ms": f.next_attempt_ms,
            "last_error": f.error,
        }
        for f in sorted(failures, key=lambda f: f.claim.user_id)
    ]
    for batch in chunks(rows):
        conn.execute(
            update(pending_fetches)
            .where(p.user_id == bindparam("uid"), p.generation == bindparam("gen"))
            .values(
                attempts=bindparam("attempts"),
                next_attempt_ms=bindparam("next_attempt_ms"),
                last_error=bindparam("last_error"),
            ),
            list(batch),
        )


def extend_leases(conn: Connection, claims: Collection[Claim], until_ms: int) -> None:
    """Renew the lease of claims a live run still holds (rows of the claimed generation
    that have not been given up; a newer trigger's row is not ours to lease)."""
    rows = [
        {"uid": c.user_id, "gen": c.generation} for c in sorted(claims, key=lambda c: c.user_id)
    ]
    for batch in chunks(rows):
        conn.execute(
            update(pending_fetches)
            .where(
                p.user_id == bindparam("uid"),
                p.generation == bindparam("gen"),
                p.next_attempt_ms.is_not(None),
            )
            .values(next_attempt_ms=until_ms),
            list(batch),
        )


def postpone(
    conn: Connection, claims: Iterable[Claim], next_attempt_ms: int, error: str | None
) -> None:
    """Put claimed rows back without counting an attempt (rate limited, lock busy, or
    the task ran out of time before reaching them)."""
    rows = [{"uid": c.user_id, "gen": c.generation} for c in claims]
    for batch in chunks(rows):
        conn.execute(
            update(pending_fetches)
            .where(p.user_id == bindparam("uid"), p.generation == bindparam("gen"))
            .values(next_attempt_ms=next_attempt_ms, last_error=error),
            list(batch),
        )


def _destination_open(now_ms: int):
    return or_(destinations.c.retry_after_ms.is_(None), destinations.c.retry_after_ms <= now_ms)


def due_by_server(
    conn: Connection, now_ms: int, servers: Collection[str] | None = None
) -> list[tuple[str, int]]:
    """Destinations (all, or among `servers`) with due users and not backed off, the
    busiest first (it is the longest to drain, so it should start first)."""
    count = func.count().label("due")
    query = (
        select(p.server_name, count)
        .select_from(
            pending_fetches.outerjoin(destinations, destinations.c.server_name == p.server_name)
        )
        .where(p.next_attempt_ms <= now_ms, _destination_open(now_ms))
        .group_by(p.server_name)
        .order_by(count.desc(), p.server_name)
    )
    if servers is not None:
        query = query.where(any_of(conn, p.server_name, sorted(servers)))
    return [(server, int(n)) for server, n in conn.execute(query)]


def coming_due_by_server(conn: Connection, now_ms: int, until_ms: int) -> list[tuple[str, int]]:
    """Destinations with no user due now but one due by `until_ms` (a lease ending, a
    short retry), with when; a destination's own backoff is not counted."""
    first = func.min(p.next_attempt_ms).label("first")
    due_now = (
        select(p.server_name)
        .where(p.next_attempt_ms <= now_ms)
        .group_by(p.server_name)
        .scalar_subquery()
    )
    query = (
        select(p.server_name, first)
        .where(p.next_attempt_ms > now_ms, p.next_attempt_ms <= until_ms)
        .where(p.server_name.not_in(due_now))
        .group_by(p.server_name)
    )
    return [(server, int(at)) for server, at in conn.execute(query)]


def has_due(conn: Connection, server_name: str, now_ms: int) -> bool:
    """Whether the destination has due users and is not backed off."""
    backed_off = (
        select(destinations.c.server_name)
        .where(destinations.c.server_name == server_name, ~_destination_open(now_ms))
        .exists()
    )
    first_due = (
        select(p.user_id)
        .where(p.server_name == server_name, p.next_attempt_ms <= now_ms, ~backed_off)
        .limit(1)
    )
    return conn.scalar(first_due) is not None


def next_due_ms(conn: Connection, server_name: str) -> int | None:
    """When the destination's next waiting user may be tried (None: nobody waits),
    counting the destination's own backoff."""
    first = conn.scalar(select(func.min(p.next_attempt_ms)).where(p.server_name == server_name))
    if first is None:
        return None
    retry_after = conn.scalar(
        select(destinations.c.retry_after_ms).where(destinations.c.server_name == server_name)
    )
    return max(first, retry_after or 0)


def revive_destination(conn: Connection, server_name: str, now_ms: int) -> int:
    """A destination came back: its users who failed while it was down (waiting for
    their own retry, or given up) are due now, with a fresh attempt budget, instead of
    each waiting out a backoff that only counted the server's outage."""
    return conn.execute(
        update(pending_fetches)
        .where(
            p.server_name == server_name,
            or_(p.next_attempt_ms.is_(None), (p.next_attempt_ms > now_ms) & (p.attempts > 0)),
        )
        .values(next_attempt_ms=now_ms, attempts=0)
    ).rowcount


@dataclass(frozen=True)
class PendingSummary:
    due: int
    waiting: int
    given_up: int


def summary(conn: Connection, now_ms: int) -> PendingSummary:
    due, waiting, given_up = conn.execute(
        select(
            func.count().filter(p.next_attempt_ms <= now_ms),
            func.count().filter(p.next_attempt_ms > now_ms),
            func.count().filter(p.next_attempt_ms.is_(None)),
        )
    ).one()
    return PendingSummary(due=due, waiting=waiting, given_up=given_up)


# Where an operator's view of a pending row stands (directory/operator.py).
DUE, IN_FLIGHT, WAITING, GIVEN_UP = "due", "in flight", "waiting", "given up"


def state_of(next_attempt_ms: int | None, now_ms: int, lease_ms: int) -> str:
    """A claim moves next_attempt_ms to the end of its lease, at most `lease_ms` ahead,
    and a live run keeps it there; so a row due within the lease is counted in flight
    (a short retry, e.g. after a 429, looks the same until it is due)."""
    if next_attempt_ms is None:
        return GIVEN_UP
    if next_attempt_ms <= now_ms:
        return DUE
    return IN_FLIGHT if next_attempt_ms <= now_ms + lease_ms else WAITING


@dataclass(frozen=True)
class StateCounts:
    due: int
    in_flight: int
    waiting: int
    given_up: int
    # The longest-due row's due time (None: nothing is due), and how many due rows wait
    # for their destination's backoff.
    oldest_due_ms: int | None
    due_behind_backoff: int


def state_counts(conn: Connection, now_ms: int, lease_ms: int) -> StateCounts:
    """Pending rows by state (see state_of), in one pass over the table."""
    lease_end = now_ms + lease_ms
    backed_off = (
        select(destinations.c.server_name)
        .where(destinations.c.server_name == p.server_name, ~_destination_open(now_ms))
        .exists()
    )
    row = conn.execute(
        select(
            func.count().filter(p.next_attempt_ms <= now_ms),
            func.count().filter(p.next_attempt_ms > now_ms, p.next_attempt_ms <= lease_end),
            func.count().filter(p.next_attempt_ms > lease_end),
            func.count().filter(p.next_attempt_ms.is_(None)),
            func.min(p.next_attempt_ms).filter(p.next_attempt_ms <= now_ms),
        )
    ).one()
    behind = conn.scalar(
        select(func.count())
        .select_from(pending_fetches)
        .where(p.next_attempt_ms <= now_ms, backed_off)
    )
    return StateCounts(
        due=int(row[0]),
        in_flight=int(row[1]),
        waiting=int(row[2]),
        given_up=int(row[3]),
        oldest_due_ms=None if row[4] is None else int(row[4]),
        due_behind_backoff=int(behind or 0),
    )


def users_by_server(conn: Connection, servers: Collection[str]) -> dict[str, int]:
    """Pending rows (any state) of each of these destinations that has some."""
    found: dict[str, int] = {}
    for batch in chunks(sorted(servers)):
        rows = conn.execute(
            select(p.server_name, func.count())
            .where(any_of(conn, p.server_name, batch))
            .group_by(p.server_name)
        )
        found.update((server, int(n)) for server, n in rows)
    return found


@dataclass(frozen=True)
class PendingRow:
    generation: int
    attempts: int
    next_attempt_ms: int | None
    reason: str
    last_error: str | None
    queued_at_ms: int


def pending_of(conn: Connection, user_id: str) -> PendingRow | None:
    row = conn.execute(
        select(
            p.generation, p.attempts, p.next_attempt_ms, p.reason, p.last_error, p.queued_at_ms
        ).where(p.user_id == user_id)
    ).one_or_none()
    return None if row is None else PendingRow(*row)


def make_due(
    conn: Connection,
    now_ms: int,
    *,
    user_id: str | None = None,
    server_name: str | None = None,
    given_up_only: bool = False,
) -> tuple[Counter[str], Counter[str]]:
    """An operator's requeue: the chosen rows (one user's, one destination's, or every
    given-up one) are due now with a fresh attempt budget; their generation stays (no
    new trigger). Returns, per destination, how many rows were made due and how many
    of them were not due before. The rows are locked first, so no run claims one between
    reading and writing it."""
    query = select(p.user_id, p.server_name, p.next_attempt_ms)
    if user_id is not None:
        query = query.where(p.user_id == user_id)
    if server_name is not None:
        query = query.where(p.server_name == server_name)
    if given_up_only:
        query = query.where(p.next_attempt_ms.is_(None))
    rows = conn.execute(query.order_by(p.user_id).with_for_update()).all()
    for batch in id_batches(conn, [user for user, _, _ in rows]):
        conn.execute(
            update(pending_fetches)
            .where(any_of(conn, p.user_id, batch))
            .values(next_attempt_ms=now_ms, attempts=0)
        )
    touched = Counter(server for _, server, _ in rows)
    became_due = Counter(server for _, server, at in rows if at is None or at > now_ms)
    return touched, became_due
