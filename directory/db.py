"""Engine creation: one place that knows the difference between SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from psycopg.types.array import ListBinaryDumper
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

# SQLite writers wait this long for the lock instead of failing at once: the HTTP
# server, the workers and beat all write the same file.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_url(url: str) -> str:
    """Accept the usual postgres:// spellings and pick the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url if isinstance(engine_or_url, str) else str(engine_or_url.url)
    return url.startswith("sqlite")


def make_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 20, pool_timeout: float = 30.0
) -> Engine:
    """The pool sizes apply to PostgreSQL (the HTTP server's search pool is smaller)."""
    url = normalise_url(url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _configure_sqlite)
        # pysqlite's own BEGIN handling defers the write lock; take it at BEGIN so two
        # writers never deadlock upgrading read locks.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
    )
    event.listen(engine, "connect", _send_lists_as_binary_arrays)
    return engine


def _send_lists_as_binary_arrays(dbapi_connection, _record) -> None:
    # The storage layer passes thousands of ids as one array parameter (= ANY, unnest).
    # psycopg's default text format escapes every element in Python, about 0.8 us each;
    # the binary format is ~5x cheaper, and that was a quarter of applying a batch.
    dbapi_connection.adapters.register_dumper(list, ListBinaryDumper)


def _configure_sqlite(dbapi_connection, _record) -> None:
    # Let SQLAlchemy issue BEGIN itself (see the "begin" listener).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # FULL: a transaction is on disk when its commit returns, so a 200 answered to the
    # homeserver survives a power cut (NORMAL in WAL mode may lose the last commits).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
