"""SQL for per-destination health: one backoff shared by all users of a server."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, select, update

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
    conn: Connection, server_name: str, now_ms: int, error: str, retry_after_ms: int | None
) -> None:
    stmt = insert_for(conn, destinations)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["server_name"],
            set_={
                "consecutive_failures": destinations.c.consecutive_failures + 1,
                "retry_after_ms": stmt.excluded.retry_after_ms,
                "last_failure_ms": now_ms,
                "last_error": error,
            },
        ),
        {
            "server_name": server_name,
            "consecutive_failures": 1,
            "retry_after_ms": retry_after_ms,
            "last_failure_ms": now_ms,
            "last_error": error,
        },
    )


def backed_off(conn: Connection, now_ms: int) -> list[tuple[str, int]]:
    return [
        (server, int(until))
        for server, until in conn.execute(
            select(d.server_name, d.retry_after_ms).where(d.retry_after_ms > now_ms)
        )
    ]
