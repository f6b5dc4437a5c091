"""Fixtures shared by the whole suite: a migrated database, a private Redis, settings."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text

from directory.config import Settings
from directory.db import make_engine
from directory.models import metadata
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.services import PrivateRedis, ThrowawayDatabase, selected_backend

SERVER_NAME = "ours.test"

# Chosen before any test imports tasks.* (the Celery app reads the environment when
# imported), so in-process code and the worker processes agree on where things are.
_WORKDIR = Path(tempfile.mkdtemp(prefix="directory-tests-"))
_DATABASE = ThrowawayDatabase(selected_backend(), _WORKDIR)
_REDIS = PrivateRedis(_WORKDIR)
os.environ.update(DATABASE_URL=_DATABASE.url, REDIS_URL=_REDIS.url, SERVER_NAME=SERVER_NAME)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    _DATABASE.create()
    yield _DATABASE.url
    _DATABASE.drop()


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: Engine) -> Engine:
    """The session's database, emptied before each test."""
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(text(f"DELETE FROM {table.name}"))
    return engine


@pytest.fixture(scope="session")
def private_redis() -> Iterator[PrivateRedis]:
    _REDIS.start()
    yield _REDIS
    _REDIS.stop()


@pytest.fixture
def redis_client(private_redis: PrivateRedis) -> Iterator[redis.Redis]:
    if private_redis.process is None or private_redis.process.poll() is not None:
        private_redis.start()
    client = redis.Redis.from_url(private_redis.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(database_url: str, private_redis: PrivateRedis) -> Settings:
    """Settings for a test: real services, short delays so retries happen in seconds."""
    return Settings(
        database_url=database_url,
        redis_url=private_redis.url,
        server_name=SERVER_NAME,
        homeserver_url="http://127.0.0.1:9",
        as_token="as-secret",
        hs_token="hs-secret",
        fetch_retry_base_seconds=0.2,
        fetch_retry_factor=2.0,
        fetch_retry_max_seconds=5.0,
        fetch_quick_retries=0,
        fetch_quick_retry_wait_seconds=0.05,
        fetch_connect_timeout_seconds=1.0,
        fetch_read_timeout_seconds=1.0,
        destination_backoff_base_seconds=0.5,
        destination_backoff_max_seconds=2.0,
        fetch_lease_seconds=5.0,
        fetch_task_budget_seconds=10.0,
        reconcile_interval_seconds=1.0,
    )


def with_settings(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, **changes)


APPSERVICE_SENDER = f"@userdirectory:{SERVER_NAME}"


@pytest.fixture
def homeserver() -> Iterator[FakeHomeserver]:
    """A real HTTP server standing in for our homeserver's client API; it knows our
    AS token (the `settings` fixture's)."""
    with FakeHomeserver() as server:
        server.set_token("as-secret", APPSERVICE_SENDER)
        yield server
