"""SQL for running totals (the `counters` table): added to in the transaction that does
the counted work, so a total is exact whichever process did the work and however
often it restarted, and /metrics reads every process's work in one place."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, select

from directory.models import counters
from directory.storage.common import insert_for


def add(conn: Connection, amounts: Mapping[str, int]) -> None:
    """Add to these totals (names created at their first use)."""
    for name, amount in sorted(amounts.items()):
        if not amount:
            continue
        stmt = insert_for(conn, counters).values(name=name, value=amount)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["name"], set_={"value": counters.c.value + amount}
            )
        )


def read(conn: Connection, prefix: str = "") -> dict[str, int]:
    """Every total whose name starts with `prefix`."""
    query = select(counters.c.name, counters.c.value)
    if prefix:
        query = query.where(counters.c.name.startswith(prefix, autoescape=True))
    return {name: int(value) for name, value in conn.execute(query)}
