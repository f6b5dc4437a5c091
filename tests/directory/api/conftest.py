"""A real HTTP server (uvicorn, in a thread) running the app against the test database,
the private Redis and the fake homeserver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from sqlalchemy import Engine

from directory.api.app import create_app
from directory.config import Settings
from directory.ingest import apply_accepted
from directory.membership import BatchOutcome
from tests.conftest import with_settings
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.services import free_port


@dataclass
class Published:
    outcomes: list[BatchOutcome] = field(default_factory=list)

    def __call__(self, outcome: BatchOutcome) -> None:
        self.outcomes.append(outcome)


@dataclass
class RunningApi:
    url: str
    settings: Settings
    published: Published
    homeserver: FakeHomeserver

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)


@pytest.fixture
def api_settings(settings: Settings, homeserver: FakeHomeserver) -> Settings:
    return with_settings(settings, homeserver_url=homeserver.url, search_rate_burst=1000)


def serve(
    settings: Settings, engine: Engine, homeserver: FakeHomeserver, *, apply: bool = True
) -> Iterator[RunningApi]:
    published = Published()

    def apply_now() -> None:
        # Stands in for the workers: applies what was just accepted, in this thread.
        while apply and apply_accepted(engine, settings, published).more:
            pass

    app = create_app(settings, engine, aioredis.Redis.from_url(settings.redis_url), apply_now)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    yield RunningApi(f"http://127.0.0.1:{port}", settings, published, homeserver)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    yield from serve(api_settings, db, homeserver)
