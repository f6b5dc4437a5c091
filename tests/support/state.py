"""Reading what the directory holds, for assertions."""

from __future__ import annotations

from sqlalchemy import Engine, select

from directory.models import user_directory


def entry_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(user_directory.c.user_id)))
