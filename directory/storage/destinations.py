"""SQL for per-destination health: one backoff shared by all users of a server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, func, select, update

from directory.models import destinations
from directory.storage.common import insert_for

d = destinations.c


@dataclass(frozen=True)
class DestinationHealth:
    consecutive_failures: int
    retry_after_ms: int | None


def health(conn: Connection, server_name: str) -> DestinationHealth:
    row = conn.execute(
        select(d.consecutive_failures, d.retry_after_ms).where(d.server_name == server_name)
    ).one_or_none()
    return DestinationHealth(*row) if row else DestinationHealth(0, None)


def record_success(conn: Connection, server_name: str, now_ms: int) -> DestinationHealth:
    """Reset the failure count; returns the health it had before."""
    before = health(conn, server_name)
    if before.consecutive_failures or before.retry_after_ms is not None:
        conn.execute(
            update(destinations)
            .where(d.server_name == server_name)
            .values(consecutive_failures=0, retry_after_ms=None, last_success_ms=now_ms)
        )
    return before


def record_failure(
    conn: Connection,
    server_name: str,
    now_ms: int,
    error: str,
    retry_at: Callable[[int], int | None],
) -> int | None:
    """Count one more consecutive failure, atomically (parallel runs failing at once
    each count theirs), and set the backoff `retry_at(failures)` for the new count.
    Returns that backoff's end (None: not backed off)."""
    stmt = insert_for(conn, destinations)
    failures = conn.scalar(
        stmt.on_conflict_do_update(
            index_elements=["server_name"],
            set_={
                "consecutive_failures": destinations.c.consecutive_failures + 1,
                "last_failure_ms": now_ms,
                "last_error": error,
            },
        ).returning(destinations.c.consecutive_failures),
        {
            "server_name": server_name,
            "consecutive_failures": 1,
            "last_failure_ms": now_ms,
            "last_error": error,
        },
    )
    # The row stays locked by the statement above until commit: no other failure can
    # be counted between reading the new count and setting its backoff.
    until = retry_at(int(failures))
    conn.execute(
        update(destinations).where(d.server_name == server_name).values(retry_after_ms=until)
    )
    return until


def take_probe(conn: Connection, server_name: str, now_ms: int, until_ms: int) -> bool:
    """The destination's backoff has ended: claim the one probe of it. True for the
    caller that got it; the backoff is pushed to `until_ms` meanwhile, so every other
    run keeps waiting for the probe's answer (which ends or renews the backoff)."""
    return bool(
        conn.execute(
            update(destinations)
            .where(
                d.server_name == server_name,
                d.retry_after_ms.is_not(None),
                d.retry_after_ms <= now_ms,
            )
            .values(retry_after_ms=until_ms)
        ).rowcount
    )


def backed_off(conn: Connection, now_ms: int) -> list[tuple[str, int]]:
    return [
        (server, int(until))
        for server, until in conn.execute(
            select(d.server_name, d.retry_after_ms).where(d.retry_after_ms > now_ms)
        )
    ]


@dataclass(frozen=True)
class Destination:
    server_name: str
    consecutive_failures: int
    retry_after_ms: int | None
    last_success_ms: int | None
    last_failure_ms: int | None
    last_error: str | None


_DESTINATION_COLUMNS = (
    d.server_name,
    d.consecutive_failures,
    d.retry_after_ms,
    d.last_success_ms,
    d.last_failure_ms,
    d.last_error,
)


def details(conn: Connection, server_name: str) -> Destination | None:
    row = conn.execute(
        select(*_DESTINATION_COLUMNS).where(d.server_name == server_name)
    ).one_or_none()
    return None if row is None else Destination(*row)


def worst_backed_off(conn: Connection, now_ms: int, limit: int) -> tuple[int, list[Destination]]:
    """How many destinations are backed off now, and the `limit` worst of them (most
    consecutive failures, then the longest wait left)."""
    backing_off = d.retry_after_ms > now_ms
    count = conn.scalar(select(func.count()).select_from(destinations).where(backing_off))
    rows = conn.execute(
        select(*_DESTINATION_COLUMNS)
        .where(backing_off)
        .order_by(d.consecutive_failures.desc(), d.retry_after_ms.desc(), d.server_name)
        .limit(limit)
    )
    return int(count or 0), [Destination(*row) for row in rows]


def clear_backoff(conn: Connection, server_name: str) -> bool:
    """An operator's requeue: the destination may be tried at once, its failure count
    starting over. True if it was failing or backed off."""
    return bool(
        conn.execute(
            update(destinations)
            .where(
                d.server_name == server_name,
                (d.consecutive_failures > 0) | d.retry_after_ms.is_not(None),
            )
            .values(consecutive_failures=0, retry_after_ms=None)
        ).rowcount
    )


def count_backed_off(conn: Connection, now_ms: int) -> int:
    """Servers waiting out a backoff now (a probe in flight included)."""
    return int(
        conn.scalar(select(func.count()).select_from(destinations).where(d.retry_after_ms > now_ms))
    )
