"""Helpers every storage module uses: dialect-specific upserts and bounded IN lists."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite

T = TypeVar("T")

# Keeps every IN (...) list and multi-row statement well under SQLite's variable limit
# and PostgreSQL's comfortable plan sizes.
CHUNK_SIZE = 1000


def insert_for(conn: Connection, table: Table):
    """An INSERT that supports ON CONFLICT on both backends."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def chunks(items: Iterable[T], size: int = CHUNK_SIZE) -> Iterator[Sequence[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def is_postgresql(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"
