"""The embedded default keeps what it answered: SQLite commits are on disk when they
return (synchronous=FULL in WAL mode), so a transaction answered 200 survives a power
cut, as on PostgreSQL (synchronous_commit on)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from directory.db import make_engine

SQLITE_FULL = 2  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA


def test_sqlite_commits_are_durable_when_they_return(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'durable.sqlite3'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA synchronous")).scalar() == SQLITE_FULL
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        engine.dispose()
