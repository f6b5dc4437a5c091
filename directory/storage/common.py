"""Helpers every storage module uses: dialect-specific upserts and bounded IN lists."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    delete,
    func,
    select,
)
from sqlalchemy import update as sql_update
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
    also_set: Mapping[str, Any] | None = None,
) -> None:
    """INSERT `rows` (tuples in `names` order) ON CONFLICT (`conflict`) DO NOTHING, or
    DO UPDATE the `update` columns to the new row's values and the `also_set` columns
    to their expressions. One statement on PostgreSQL, whatever the count."""
    if not rows:
        return

    def on_conflict(stmt: Any) -> Any:
        if not update and not also_set:
            return stmt.on_conflict_do_nothing(index_elements=list(conflict))
        return stmt.on_conflict_do_update(
            index_elements=list(conflict),
            set_={**{name: stmt.excluded[name] for name in update}, **(also_set or {})},
        )

    if is_postgresql(conn):
        stmt = postgresql.insert(table).from_select(list(names), rows_as_arrays(table, names, rows))
        conn.execute(on_conflict(stmt))
        return
    for batch in chunks(rows):
        conn.execute(
            on_conflict(sqlite.insert(table)), [dict(zip(names, row, strict=True)) for row in batch]
        )


def update_rows(
    conn: Connection,
    table: Table,
    key: str,
    names: Sequence[str],
    rows: Sequence[Sequence[Any]],
) -> None:
    """UPDATE the row whose `key` is each row's first value, setting the `names`
    columns to the rest (tuples in (key, *names) order; one row per key). One
    `UPDATE ... FROM unnest(...)` on PostgreSQL, whatever the count."""
    if not rows:
        return
    if is_postgresql(conn):
        values = rows_as_arrays(table, (key, *names), rows).subquery()
        conn.execute(
            sql_update(table)
            .where(table.c[key] == values.c[key])
            .values({name: values.c[name] for name in names})
        )
        return
    statement = (
        sql_update(table)
        .where(table.c[key] == bindparam("_key"))
        .values({name: bindparam(name) for name in names})
    )
    for batch in chunks(rows):
        conn.execute(
            statement, [{"_key": row[0], **dict(zip(names, row[1:], strict=True))} for row in batch]
        )


def delete_rows(
    conn: Connection, table: Table, names: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """DELETE the rows matching each tuple of `names` values. One statement on
    PostgreSQL, whatever the count."""
    rows = list(rows)
    if not rows:
        return
    if is_postgresql(conn):
        keys = rows_as_arrays(table, names, rows).subquery()
        conn.execute(delete(table).where(*(table.c[name] == keys.c[name] for name in names)))
        return
    statement = delete(table).where(*(table.c[name] == bindparam(name) for name in names))
    for batch in chunks(rows):
        conn.execute(statement, [dict(zip(names, row, strict=True)) for row in batch])
