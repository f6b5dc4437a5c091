"""Helpers for the operator commands' tests: state made through the hooks (and the
storage calls the workers make), the commands run as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import Engine, String, select

from directory.clock import now_ms
from directory.config import PROJECT_ROOT, Settings
from directory.events import ProfileValue, server_name_of
from directory.fetching import apply_results
from directory.membership import BatchOutcome, process_events
from directory.models import metadata
from directory.profile_client import FetchResult, Outcome
from directory.storage import pending
from tests.conftest import SERVER_NAME, with_settings
from tests.support.processes import settings_env

# Fixtures for the tests that run real workers against the fake homeserver.
from tests.tasks.conftest import pipeline_settings, processes  # noqa: F401

BOB = f"@bob:{SERVER_NAME}"
GINA = f"@gina:{SERVER_NAME}"
ALICE = "@alice:remote.test"
CAROL = "@carol:remote.test"
DAVE = "@dave:remote.test"
ERIN = "@erin:other.test"
FRANK = "@frank:remote.test"
HANK = "@hank:remote.test"
HOUR_MS = 3_600_000


@pytest.fixture
def cli_settings(settings: Settings) -> Settings:
    # A claim's lease outlasts the command's start, so a claimed row shows in flight.
    return with_settings(settings, fetch_lease_seconds=60.0)


def run_cli(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "directory", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **_env(settings)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def popen_cli(settings: Settings, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "directory", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **_env(settings)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _env(settings: Settings) -> dict[str, str]:
    return {**settings_env(settings), "PYTHONUNBUFFERED": "1"}


def apply(engine: Engine, settings: Settings, events: Sequence[object]) -> BatchOutcome:
    """Events applied through the hooks, as the inbox consumer applies them."""
    with engine.begin() as conn:
        return process_events(
            conn,
            list(events),
            server_name=settings.server_name,
            now_ms=now_ms(),
            profile_max_age_seconds=settings.profile_max_age_seconds,
        )


def claim(engine: Engine, server_name: str, lease_ms: int = 60_000) -> dict[str, pending.Claim]:
    """Every due user of the destination, claimed as a fetch run claims them."""
    now = now_ms()
    with engine.begin() as conn:
        claims = pending.claim(conn, server_name, now, now + lease_ms, 1000)
    return {c.user_id: c for c in claims}


def fetched(
    engine: Engine, settings: Settings, user_id: str, name: str, avatar: str | None
) -> None:
    """The user's public profile, fetched and applied as a fetch run applies it."""
    claims = claim(engine, server_name_of(user_id))
    taken = claims.pop(user_id)
    result = FetchResult(Outcome.OK, profile=ProfileValue(name, avatar), status=200)
    with engine.begin() as conn:
        apply_results(conn, [(taken, result)], settings, now_ms())
        # The others claimed with it are handed back, due, as a run hands them back.
        pending.postpone(conn, list(claims.values()), now_ms(), None)


def fail(engine: Engine, taken: pending.Claim, next_attempt_ms: int | None, attempts: int) -> None:
    """Record `attempts` failed attempts of a claimed user (None: given up)."""
    failure = pending.Failure(
        pending.Claim(taken.user_id, taken.server_name, taken.generation, attempts - 1),
        next_attempt_ms,
        "HTTP 502 from the remote server",
    )
    with engine.begin() as conn:
        pending.record_failures(conn, [failure])


def rows_mentioning(engine: Engine, text: str) -> list[tuple[str, dict[str, Any]]]:
    """Every row of every table with a string column holding `text`."""
    found = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            columns = [c for c in table.columns if isinstance(c.type, String)]
            for row in conn.execute(select(table)).mappings():
                if any(text in (row[c.name] or "") for c in columns):
                    found.append((table.name, dict(row)))
    return found
