"""Fixtures for end-to-end pipeline tests: events in through the hooks, real Celery
worker (and beat) processes, a real HTTP server as the homeserver, search out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from directory.config import Settings
from directory.models import pending_fetches, user_directory
from tests.conftest import with_settings
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.processes import ProcessGroup, wait_until


@pytest.fixture
def pipeline_settings(settings: Settings, homeserver: FakeHomeserver) -> Settings:
    return with_settings(settings, homeserver_url=homeserver.url, worker_concurrency=8)


@pytest.fixture
def processes(
    pipeline_settings: Settings, db: Engine, redis_client: Any, tmp_path: Path
) -> Iterator[ProcessGroup]:
    group = ProcessGroup(pipeline_settings, tmp_path)
    yield group
    group.kill_all()


def entry(engine: Engine, user_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(user_directory).where(user_directory.c.user_id == user_id)
        ).one_or_none()
    return row._asdict() if row else None


def pending_row(engine: Engine, user_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(pending_fetches).where(pending_fetches.c.user_id == user_id)
        ).one_or_none()
    return row._asdict() if row else None


def wait_for_name(engine: Engine, user_id: str, name: str | None, timeout: float = 20) -> None:
    def has_name() -> bool:
        found = entry(engine, user_id)
        return (
            found is not None
            and found["fetched_at_ms"] is not None
            and (found["display_name"] == name)
        )

    wait_until(has_name, timeout, what=f"{user_id} to show {name!r}")


def wait_for_no_pending(engine: Engine, timeout: float = 20) -> None:
    def empty() -> bool:
        with engine.connect() as conn:
            return conn.execute(select(pending_fetches.c.user_id).limit(1)).first() is None

    wait_until(empty, timeout, what="the pending table to drain")
