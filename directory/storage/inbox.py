"""SQL for the event inbox (directory/ingest.py explains the flow)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import (
    Connection,
    LargeBinary,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
)

from directory.models import appservice_transactions, event_inbox
from directory.storage.common import any_of, id_batches, is_postgresql

# Any constant: the key of the PostgreSQL advisory lock only the inbox consumer takes.
CONSUMER_LOCK_KEY = 0x55_44_49_42
# What an inbox row holds: a homeserver transaction's events, or a room snapshot.
EVENTS = "events"
SNAPSHOT = "snapshot"
# Transactions looked at per take; a homeserver sends at most 100 events in each.
MAX_ROWS_PER_TAKE = 1000


@dataclass(frozen=True)
class InboxItem:
    id: int
    payload: bytes
    kind: str = EVENTS
    # When it was accepted (event_inbox.received_at_ms).
    received_at_ms: int = 0


@dataclass(frozen=True)
class Taken:
    items: list[InboxItem]
    # Accepted transactions were left for the next take.
    more: bool


@dataclass(frozen=True)
class Backlog:
    transactions: int
    events: int
    oldest_ms: int | None


def append(conn: Connection, payload: bytes, events: int, now_ms: int, kind: str = EVENTS) -> None:
    conn.execute(
        insert(event_inbox).values(received_at_ms=now_ms, events=events, payload=payload, kind=kind)
    )


# One statement, so that in autocommit mode it is one round trip and one commit (the
# path the homeserver waits for); a text() construct, because building and caching
# the equivalent Core CTE costs more per call than the database spends on it.
_APPEND_UNLESS_SEEN = text(
    "WITH recorded AS ("
    f" INSERT INTO {appservice_transactions.name} (txn_id, received_at_ms, events)"
    " VALUES (:txn_id, :now_ms, :events)"
    " ON CONFLICT (txn_id) DO NOTHING RETURNING txn_id)"
    f" INSERT INTO {event_inbox.name} (received_at_ms, events, payload)"
    " SELECT :now_ms, :events, :payload FROM recorded RETURNING id"
).bindparams(bindparam("payload", type_=LargeBinary))


def append_unless_seen(
    conn: Connection, txn_id: str, payload: bytes, events: int, now_ms: int
) -> bool:
    """Record the txn id and append its events in one statement (PostgreSQL). False if
    the txn id was seen before.

    A concurrent duplicate waits on the first one's txn id row and then inserts
    nothing, so a transaction is stored once even when the homeserver retries
    mid-request."""
    params = {"txn_id": txn_id, "now_ms": now_ms, "events": events, "payload": payload}
    return conn.execute(_APPEND_UNLESS_SEEN, params).first() is not None


def lock_consumer(conn: Connection) -> None:
    """Wait until no other consumer is applying, for the rest of the caller's transaction.
    Whatever else writes memberships (the prune) takes it too: there is one writer.

    On SQLite the transaction already holds the database's only write lock (BEGIN
    IMMEDIATE), which is the same guarantee."""
    if is_postgresql(conn):
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CONSUMER_LOCK_KEY})


def try_lock_consumer(conn: Connection) -> bool:
    """lock_consumer without waiting: False if another consumer is applying."""
    if not is_postgresql(conn):
        lock_consumer(conn)
        return True
    return bool(
        conn.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": CONSUMER_LOCK_KEY})
    )


def take(conn: Connection, max_events: int) -> Taken:
    """The oldest transactions, as many as fit in `max_events` (at least one)."""
    t = event_inbox.c
    counts = conn.execute(select(t.id, t.events).order_by(t.id).limit(MAX_ROWS_PER_TAKE)).all()
    total, taken, last_id = 0, 0, None
    for row_id, events in counts:
        if last_id is not None and total + events > max_events:
            break
        total += events
        taken += 1
        last_id = row_id
    if last_id is None:
        return Taken([], False)
    rows = conn.execute(
        select(t.id, t.payload, t.kind, t.received_at_ms).where(t.id <= last_id).order_by(t.id)
    )
    return Taken(
        [
            InboxItem(row_id, payload, kind, received_at_ms)
            for row_id, payload, kind, received_at_ms in rows
        ],
        taken < len(counts),
    )


def remove(conn: Connection, ids: Collection[int]) -> None:
    for batch in id_batches(conn, ids):
        conn.execute(delete(event_inbox).where(any_of(conn, event_inbox.c.id, batch)))


def backlog(conn: Connection) -> Backlog:
    t = event_inbox.c
    count, events, oldest = conn.execute(
        select(func.count(), func.coalesce(func.sum(t.events), 0), func.min(t.received_at_ms))
    ).one()
    return Backlog(count, int(events), oldest)
