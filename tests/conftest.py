"""Fixtures shared by the whole suite: a migrated database, a private Redis, settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import Engine, text

from directory.config import Settings
from directory.db import make_engine
from directory.models import metadata
from tests.support.services import PrivateRedis, ThrowawayDatabase, selected_backend

SERVER_NAME = "ours.test"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    database = ThrowawayDatabase(selected_backend(), tmp_path_factory.mktemp("db"))
    database.create()
    yield database.url
    database.drop()


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
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


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
