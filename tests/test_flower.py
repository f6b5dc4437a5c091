"""Flower, as `make flower` starts it, watching the default layout's two workers: its
API lists both and the tasks they ran, each named for what it does."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from directory.config import PROJECT_ROOT, Settings
from directory.ingest import accept_transaction
from tests.conftest import SERVER_NAME, with_settings
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.processes import ProcessGroup, wait_until
from tests.support.services import free_port

ALICE = "@alice:remote.test"
BOB = f"@bob:{SERVER_NAME}"
AUTH = ("ops", "flower-test-password")


@pytest.fixture
def flower(
    settings: Settings, db: Engine, redis_client: Any, homeserver: FakeHomeserver, tmp_path: Path
) -> Iterator[tuple[httpx.Client, ProcessGroup]]:
    configured = with_settings(settings, homeserver_url=homeserver.url, worker_concurrency=4)
    processes = ProcessGroup(configured, tmp_path)
    port = free_port()
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        # Flower 2.x serves its API only with authentication configured (or with
        # FLOWER_UNAUTHENTICATED_API=true): basic auth, as an operator would set it.
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks.app",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                f"--basic-auth={AUTH[0]}:{AUTH[1]}",
            ],
            cwd=PROJECT_ROOT,
            env=processes.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:

        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"flower exited:\n{log.read_text(errors='replace')}")
            try:
                client.get("/healthcheck")
            except httpx.HTTPError:
                return False
            return True

        wait_until(listening, 60, 0.2, f"flower to listen (log: {log})")
        # The default layout's workers, as run.py names them.
        processes.start_worker("events", "-Q", "events,maintenance", "-c", "4")
        processes.start_worker("fetch", "-Q", "fetch")
        yield client, processes
    finally:
        client.close()
        process.kill()
        process.wait()
        processes.kill_all()


def test_flower_shows_the_workers_and_the_tasks_by_name(
    flower: tuple[httpx.Client, ProcessGroup], homeserver: FakeHomeserver, db: Engine
) -> None:
    client, _processes = flower
    homeserver.set_profile(ALICE, "Alice")
    # The API wants the credentials.
    assert client.get("/api/workers").status_code == 401

    def workers() -> set[str] | None:
        response = client.get("/api/workers", params={"refresh": "true"}, auth=AUTH)
        assert response.status_code == 200, response.text
        names = {name.split("@")[0] for name in response.json()}
        return names if {"events", "fetch"} <= names else None

    wait_until(workers, 30, 0.5, "flower to list both workers")

    # A transaction as the HTTP server accepts it, the consumer woken: the events worker
    # applies it, the fetch worker fetches Alice's profile; and one of beat's jobs.
    from tasks.app import app
    from tasks.outbox import wake_inbox_consumer

    events = [join_rules("!pub:x", "public"), member("!pub:x", BOB), member("!pub:x", ALICE)]
    assert accept_transaction(db, events, "flower-1")
    wake_inbox_consumer(force=True)
    app.send_task("tasks.maintenance.reconcile")

    expected = {
        "tasks.events.apply_inbox": "events",
        "tasks.fetch.fetch_destination": "fetch",
        "tasks.maintenance.reconcile": "events",
    }

    def tasks_seen() -> dict[str, set[str]] | None:
        response = client.get("/api/tasks", auth=AUTH)
        assert response.status_code == 200, response.text
        done: dict[str, set[str]] = {}
        for task in response.json().values():
            if task.get("state") == "SUCCESS" and task.get("name"):
                done.setdefault(task["name"], set()).add(task["worker"].split("@")[0])
        return done if set(expected) <= set(done) else None

    seen = wait_until(tasks_seen, 30, 0.5, "flower to show the tasks")
    assert isinstance(seen, dict)
    for name, worker in expected.items():
        assert seen[name] == {worker}, seen
    # Every task Flower saw is named for its module and what it does.
    assert all(name.startswith("tasks.") and name.count(".") == 2 for name in seen), seen
    assert homeserver.count(ALICE) >= 1
