"""SQL for running totals (the `counters` table): added to in the transaction that does
the counted work, so a total is exact whichever process did the work and however
often it restarted, and /metrics reads every process's work in one place.

An addition locks its rows until the transaction ends, so totals that many
transactions add to at once (every fetch run's commits) are spread over SHARDS rows
each, `name#shard`, which `read` adds back up: concurrent commits then rarely wait
for each other. Every addition is one statement, its rows in name order, so two
transactions never wait for each other's rows in opposite orders; callers add last
in their transaction, so the rows are held only until its commit."""

from __future__ import annotations

import random
from collections.abc import Mapping

from sqlalchemy import Connection, select

from directory.models import counters
from directory.storage.common import insert_for

SHARDS = 16
SHARD_SEPARATOR = "#"


def add(conn: Connection, amounts: Mapping[str, int], *, sharded: bool = False) -> None:
    """Add to these totals (names created at their first use), in one statement.
    `sharded`: into one of the names' SHARDS rows, for totals added to concurrently."""
    suffix = f"{SHARD_SEPARATOR}{random.randrange(SHARDS)}" if sharded else ""
    rows = sorted(
        ({"name": name + suffix, "value": amount} for name, amount in amounts.items() if amount),
        key=lambda row: row["name"],
    )
    if not rows:
        return
    stmt = insert_for(conn, counters).values(rows)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["name"], set_={"value": counters.c.value + stmt.excluded.value}
        )
    )


def read(conn: Connection, prefix: str = "") -> dict[str, int]:
    """Every total whose name starts with `prefix` (a sharded total's rows added up)."""
    query = select(counters.c.name, counters.c.value)
    if prefix:
        query = query.where(counters.c.name.startswith(prefix, autoescape=True))
    totals: dict[str, int] = {}
    for name, value in conn.execute(query):
        base = name.partition(SHARD_SEPARATOR)[0]
        totals[base] = totals.get(base, 0) + int(value)
    return totals
