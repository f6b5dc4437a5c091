"""SQL for the event inbox (directory/ingest.py explains the flow)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    LargeBinary,
    delete,
    func,
    insert,
    literal,
    select,
    text,
)
from sqlalchemy.dialects import postgresql

from directory.models import appservice_transactions, event_inbox
from directory.storage.common import any_of, id_batches, is_postgresql

# Any constant: the key of the PostgreSQL advisory lock only the inbox consumer takes.
CONSUMER_LOCK_KEY = 0x55_44_49_42
# Transactions looked at per take; a homeserver sends at most 100 events in each.
MAX_ROWS_PER_TAKE = 1000


@dataclass(frozen=True)
class InboxItem:
    id: int
    payload: bytes


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


def append(conn: Connection, payload: bytes, events: int, now_ms: int) -> None:
    conn.execute(insert(event_inbox).values(received_at_ms=now_ms, events=events, payload=payload))


def append_unless_seen(
    conn: Connection, txn_id: str, payload: bytes, events: int, now_ms: int
) -> bool:
    """Record the txn id and append its events in one statement (PostgreSQL; one round
    trip on the path the homeserver waits for). False if the txn id was seen before.

    A concurrent duplicate waits on the first one's txn id row and then inserts
    nothing, so a transaction is stored once even when the homeserver retries
    mid-request."""
    seen = appservice_transactions
    recorded = (
        postgresql.insert(seen)
        .values(txn_id=txn_id, received_at_ms=now_ms, events=events)
        .on_conflict_do_nothing(index_elements=["txn_id"])
        .returning(seen.c.txn_id)
        .cte("recorded")
    )
    stored = conn.execute(
        insert(event_inbox)
        .from_select(
            ["received_at_ms", "events", "payload"],
            select(
                literal(now_ms, BigInteger), literal(events, Integer), literal(payload, LargeBinary)
            ).select_from(recorded),
        )
        .returning(event_inbox.c.id)
    ).first()
    return stored is not None


def lock_consumer(conn: Connection) -> None:
    """Wait until no other consumer is applying, for the rest of the caller's transaction.

    On SQLite the transaction already holds the database's only write lock (BEGIN
    IMMEDIATE), which is the same guarantee."""
    if is_postgresql(conn):
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CONSUMER_LOCK_KEY})


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
    rows = conn.execute(select(t.id, t.payload).where(t.id <= last_id).order_by(t.id))
    return Taken([InboxItem(row_id, payload) for row_id, payload in rows], taken < len(counts))


def remove(conn: Connection, ids: Collection[int]) -> None:
    for batch in id_batches(conn, ids):
        conn.execute(delete(event_inbox).where(any_of(conn, event_inbox.c.id, batch)))


def backlog(conn: Connection) -> Backlog:
    t = event_inbox.c
    count, events, oldest = conn.execute(
        select(func.count(), func.coalesce(func.sum(t.events), 0), func.min(t.received_at_ms))
    ).one()
    return Backlog(count, int(events), oldest)
