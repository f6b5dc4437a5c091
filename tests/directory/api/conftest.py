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
from directory.storage import inbox
from tests.conftest import with_settings
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.processes import wait_until
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
    engine: Engine
    # Held while the stand-in worker applies; None when this server does not apply.
    applying: threading.Lock | None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def settle(self) -> None:
        """Until what was accepted is applied: the wake-up runs after the answer."""
        if self.applying is None:
            return

        def inbox_empty() -> bool:
            with self.engine.connect() as conn:
                return inbox.backlog(conn).transactions == 0

        # The last row leaves the inbox inside an apply that holds the lock until its
        # outcome is published, so taking the lock after seeing it empty waits for that.
        wait_until(inbox_empty, timeout=10)
        with self.applying:
            pass


@pytest.fixture
def api_settings(settings: Settings, homeserver: FakeHomeserver) -> Settings:
    return with_settings(
        settings,
        homeserver_url=homeserver.url,
        search_rate_burst=1000,
        search_unverified_rate_burst=1000,
    )


def serve(
    settings: Settings,
    engine: Engine,
    homeserver: FakeHomeserver,
    *,
    apply: bool = True,
    search_engine: Engine | None = None,
) -> Iterator[RunningApi]:
    published = Published()
    applying = threading.Lock()

    def apply_now() -> None:
        # Stands in for the workers: applies what was just accepted, in this thread.
        with applying:
            while apply_accepted(engine, settings, published).more:
                pass

    def leave_it() -> None:
        pass

    wake = apply_now if apply else leave_it
    app = create_app(
        settings,
        engine,
        aioredis.Redis.from_url(settings.redis_url),
        wake,
        search_engine=search_engine,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    yield RunningApi(url, settings, published, homeserver, engine, applying if apply else None)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    yield from serve(api_settings, db, homeserver)
