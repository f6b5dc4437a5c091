"""Helpers every storage module uses: dialect-specific upserts and bounded IN lists."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Engine,
    Select,
    Table,
    any_,
    bindparam,
    func,
    select,
)
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


def is_postgresql(conn: Connection | Engine) -> bool:
    return conn.dialect.name == "postgresql"


def id_batches(conn: Connection, ids: Iterable[T]) -> Iterator[Sequence[T]]:
    """Sorted ids in lists small enough for one `any_of` each: all at once on
    PostgreSQL (one array parameter), SQLite-sized chunks otherwise."""
    ordered = sorted(ids)  # type: ignore[type-var]
    if is_postgresql(conn):
        if ordered:
            yield ordered
        return
    yield from chunks(ordered)


def any_of(
    conn: Connection, column: ColumnElement[Any], values: Sequence[Any]
) -> ColumnElement[bool]:
    """`column IN values`. On PostgreSQL one array parameter (`= ANY`), so neither the
    statement's text nor its compile and parse cost grow with the list: an expanding
    IN of 5,000 ids costs more in SQLAlchemy and the driver than in the database."""
    if is_postgresql(conn):
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(values)


def rows_as_arrays(table: Table, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> Select:
    """`SELECT * FROM unnest(array, array, ...)`: many rows as one array parameter per
    column (PostgreSQL), for `INSERT ... SELECT`. A multi-row VALUES list costs one bound
    parameter per cell to compile and send; this costs one per column."""
    arrays = [
        bindparam(None, [row[i] for row in rows], type_=ARRAY(table.c[name].type))
        for i, name in enumerate(names)
    ]
    values = func.unnest(*arrays).table_valued(*names).render_derived()
    return select(*(values.c[name] for name in names))


def upsert_rows(
    conn: Connection,
    table: Table,
    names: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    conflict: Sequence[str],
    update: Sequence[str] = (),
) -> None:
    """INSERT `rows` (tuples in `names` order) ON CONFLICT (`conflict`) DO NOTHING, or
    DO UPDATE the `update` columns. One statement on PostgreSQL, whatever the count."""
    if not rows:
        return

    def on_conflict(stmt: Any) -> Any:
        if not update:
            return stmt.on_conflict_do_nothing(index_elements=list(conflict))
        return stmt.on_conflict_do_update(
            index_elements=list(conflict), set_={name: stmt.excluded[name] for name in update}
        )

    if is_postgresql(conn):
        stmt = postgresql.insert(table).from_select(list(names), rows_as_arrays(table, names, rows))
        conn.execute(on_conflict(stmt))
        return
    for batch in chunks(rows):
        conn.execute(
            on_conflict(sqlite.insert(table)), [dict(zip(names, row, strict=True)) for row in batch]
        )
