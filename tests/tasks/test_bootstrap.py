"""Installed on a homeserver that already has rooms (docs/design.md, scenario 13): `python -m
directory bootstrap` lists every room, loads each through the workers and the inbox,
and afterwards everyone a searcher may find is found with their public name, nobody by
a per-room name. Durable and resumable (killing the CLI and the workers loses nothing,
finished rooms are not read again), polite (429 honoured, one request per room), a
second run changes nothing, and an operator mistake is one clear line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from sqlalchemy import Engine, func, select

from directory.api.metrics import Metrics
from directory.clock import now_ms
from directory.config import PROJECT_ROOT, Settings
from directory.models import (
    bootstrap_rooms,
    bootstrap_runs,
    pending_fetches,
    room_members,
    rooms,
    user_directory,
)
from directory.search import search_directory
from tests.conftest import SERVER_NAME, with_settings
from tests.support.events import member
from tests.support.fake_homeserver import FakeHomeserver, FakeRoom, Reply
from tests.support.processes import ProcessGroup, settings_env, wait_until
from tests.support.services import free_port
from tests.tasks.conftest import wait_for_no_pending

BOB = f"@bob:{SERVER_NAME}"
EVE = f"@eve:{SERVER_NAME}"
ALICE = "@alice:remote.test"
CAROL = "@carol:other.test"
DAVE = "@dave:remote.test"
FRANK = "@frank:other.test"
ZED = "@zed:remote.test"
ADMIN_TOKEN = "admin-secret"


@pytest.fixture
def boot_settings(pipeline_settings: Settings) -> Settings:
    return with_settings(pipeline_settings, admin_token=ADMIN_TOKEN, bootstrap_concurrency=2)


def cli_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}


def bootstrap_cli(
    settings: Settings, *args: str, timeout: float = 90
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "directory", "bootstrap", *args],
        cwd=PROJECT_ROOT,
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def existing_homeserver(homeserver: FakeHomeserver) -> None:
    """Rooms made before we were registered; per-room names that must never show."""
    homeserver.set_admin_token(ADMIN_TOKEN)
    for user_id, name in ((ALICE, "Alice"), (CAROL, "Carol"), (DAVE, "Dave"), (FRANK, "Frank")):
        homeserver.set_profile(user_id, name)
    homeserver.set_room(
        "!lobby:remote.test",
        FakeRoom(
            members={BOB: {}, ALICE: {"display_name": "Ally"}, CAROL: {}},
            join_rule="public",
        ),
    )
    homeserver.set_room(
        "!secret:remote.test",
        FakeRoom(members={BOB: {}, DAVE: {"display_name": "Delia"}}, join_rule="invite"),
    )
    homeserver.set_room(
        "!quiet:other.test", FakeRoom(members={EVE: {}, FRANK: {}}, join_rule="invite")
    )
    # No local member: not ours to load.
    homeserver.set_room("!far:remote.test", FakeRoom(members={ZED: {}}, join_rule="public"))


def names(db: Engine, searcher: str, term: str) -> dict[str, str]:
    with db.connect() as conn:
        result = search_directory(conn, searcher, term, 50)
    return {hit.user_id: hit.display_name for hit in result.results}


def table_state(db: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Everything a second run must leave as it was (the check times aside)."""
    with db.connect() as conn:
        return {
            "entries": sorted(tuple(row) for row in conn.execute(select(user_directory))),
            "members": sorted(tuple(row) for row in conn.execute(select(room_members))),
            "rooms": sorted(
                (r.room_id, r.join_rule, r.history_visibility, r.is_public, r.is_visible)
                for r in conn.execute(select(rooms))
            ),
            "pending": sorted(tuple(row) for row in conn.execute(select(pending_fetches))),
        }


def test_bootstrap_finds_everyone_allowed_with_public_names_and_a_second_run_changes_nothing(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver, boot_settings: Settings
) -> None:
    existing_homeserver(homeserver)
    processes.env.update(settings_env(boot_settings))
    processes.start_worker()

    done = bootstrap_cli(boot_settings)
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"bootstrap run \d+ started: rooms from Synapse's admin room list", done.stdout
    )
    assert "rooms 3/3" in done.stdout
    assert re.search(
        r"finished in \S+: 3 rooms loaded, 7 memberships \([\d,]+/s\), 0 rooms", done.stdout
    )
    wait_for_no_pending(db)

    assert names(db, EVE, "alice") == {ALICE: "Alice"}  # a public room: anyone
    assert names(db, BOB, "dave") == {DAVE: "Dave"}  # shares the private room
    assert names(db, EVE, "dave") == {}
    assert names(db, EVE, "frank") == {FRANK: "Frank"}
    assert names(db, BOB, "frank") == {}
    for searcher in (BOB, EVE):
        assert names(db, searcher, "delia") == {} and names(db, searcher, "ally") == {}
    assert names(db, BOB, "zed") == {} and names(db, EVE, "zed") == {}

    # One request per room, plus the listing page.
    reads = [room for room, reader in homeserver.room_reads if reader == "admin"]
    assert sorted(reads) == ["!lobby:remote.test", "!quiet:other.test", "!secret:remote.test"]
    admin_requests = [p for p in homeserver.api_requests if p.startswith("/_synapse/admin/")]
    assert len(admin_requests) <= 3 * 3

    before, profile_requests = table_state(db), homeserver.count()
    again = bootstrap_cli(boot_settings)
    assert again.returncode == 0, again.stderr
    assert re.search(r"bootstrap run \d+ started", again.stdout)
    time.sleep(1.0)  # anything it queued would be under way by now
    assert table_state(db) == before
    assert homeserver.count() == profile_requests


def test_the_run_resumes_after_the_cli_and_the_workers_are_killed(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver, boot_settings: Settings
) -> None:
    homeserver.set_admin_token(ADMIN_TOKEN)
    all_rooms = [f"!room{i:02d}:remote.test" for i in range(24)]
    for i, room_id in enumerate(all_rooms):
        homeserver.set_room(room_id, FakeRoom(members={BOB: {}, f"@user{i}:remote.test": {}}))
    homeserver.set_room_read_latency(0.25)
    processes.env.update(settings_env(boot_settings))
    processes.start_worker()
    cli = subprocess.Popen(
        [sys.executable, "-m", "directory", "bootstrap"],
        cwd=PROJECT_ROOT,
        env=cli_env(boot_settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def loaded() -> set[str]:
        with db.connect() as conn:
            return set(
                conn.scalars(
                    select(bootstrap_rooms.c.room_id).where(bootstrap_rooms.c.state == "loaded")
                )
            )

    try:
        wait_until(lambda: len(loaded()) >= 6, 30, what="some rooms loaded")
    finally:
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()
    processes.kill("worker1")
    finished_before = loaded()
    assert len(finished_before) < len(all_rooms)

    processes.start_worker("worker2")
    done = bootstrap_cli(boot_settings)
    assert done.returncode == 0, done.stderr
    assert re.search(r"bootstrap run \d+ resumed", done.stdout)
    assert loaded() == set(all_rooms)
    reads: dict[str, int] = {}
    for room_id, _reader in homeserver.room_reads:
        reads[room_id] = reads.get(room_id, 0) + 1
    assert all(reads[room] == 1 for room in finished_before), reads
    assert max(reads.values()) <= 2  # only rooms in flight at the kill are read twice
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(room_members)) == 2 * len(all_rooms)


def test_without_an_admin_token_rooms_come_from_the_listed_users(
    db: Engine,
    processes: ProcessGroup,
    homeserver: FakeHomeserver,
    pipeline_settings: Settings,
    tmp_path: Path,
) -> None:
    existing_homeserver(homeserver)
    homeserver.set_admin_token(None)
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"# our users\n{BOB}\n\n{EVE}\n{BOB}\n")
    processes.start_worker()

    done = bootstrap_cli(pipeline_settings, "--users-file", str(users_file))
    assert done.returncode == 0, done.stderr
    assert "rooms from 2 users" in done.stdout
    wait_for_no_pending(db)
    assert names(db, BOB, "dave") == {DAVE: "Dave"}
    assert names(db, EVE, "frank") == {FRANK: "Frank"}
    assert names(db, EVE, "alice") == {ALICE: "Alice"}
    readers = {room: reader for room, reader in homeserver.room_reads}
    assert readers == {
        "!lobby:remote.test": BOB,
        "!secret:remote.test": BOB,
        "!quiet:other.test": EVE,
    }


def test_operator_mistakes_are_one_clear_line_and_a_non_zero_exit(
    db: Engine, homeserver: FakeHomeserver, boot_settings: Settings, tmp_path: Path
) -> None:
    homeserver.set_admin_token("the-real-one")
    refused = bootstrap_cli(boot_settings)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "python -m directory bootstrap: the homeserver refused ADMIN_TOKEN"
        " (HTTP 401 M_UNKNOWN_TOKEN): check ADMIN_TOKEN"
    ]

    unreachable = bootstrap_cli(
        with_settings(boot_settings, homeserver_url=f"http://127.0.0.1:{free_port()}")
    )
    assert unreachable.returncode == 2
    [line] = unreachable.stderr.strip().splitlines()
    assert "cannot reach the homeserver at http://127.0.0.1:" in line

    no_token = bootstrap_cli(with_settings(boot_settings, admin_token=""))
    assert no_token.returncode == 2
    assert "needs ADMIN_TOKEN" in no_token.stderr and len(no_token.stderr.splitlines()) == 1

    bad_file = tmp_path / "users.txt"
    bad_file.write_text("@someone:elsewhere.test\n")
    wrong_user = bootstrap_cli(boot_settings, "--users-file", str(bad_file))
    assert wrong_user.returncode == 2
    assert "not a local user of ours.test" in wrong_user.stderr
    with db.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(bootstrap_rooms)) == 0


def test_a_429_is_honoured_and_searches_keep_working_meanwhile(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver, boot_settings: Settings
) -> None:
    existing_homeserver(homeserver)
    # Known from events before the bootstrap: must stay searchable throughout.
    homeserver.set_profile(CAROL, "Carol")
    processes.env.update(settings_env(boot_settings))
    processes.start_worker()
    from tasks.ingest import ingest_events

    ingest_events([member("!lobby:remote.test", BOB), member("!lobby:remote.test", CAROL)])
    wait_for_no_pending(db)
    state_path = "/_synapse/admin/v1/rooms/%21secret%3Aremote.test/state"
    homeserver.script_api(
        state_path, Reply(429, {"errcode": "M_LIMIT_EXCEEDED"}, headers=(("Retry-After", "2"),))
    )
    cli = subprocess.Popen(
        [sys.executable, "-m", "directory", "bootstrap"],
        cwd=PROJECT_ROOT,
        env=cli_env(boot_settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen_carol: list[bool] = []
    while cli.poll() is None:
        seen_carol.append(CAROL in names(db, EVE, "carol"))
        time.sleep(0.05)
    _, err = cli.communicate()
    assert cli.returncode == 0, err
    assert seen_carol and all(seen_carol)
    times = [t for path, t in homeserver.api_request_times if path == state_path]
    assert len(times) == 2 and times[1] - times[0] >= 2.0
    with db.connect() as conn:
        states = dict(
            conn.execute(select(bootstrap_rooms.c.room_id, bootstrap_rooms.c.state)).all()
        )
    assert set(states.values()) == {"loaded"}


def test_status_and_metrics_show_the_run(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver, boot_settings: Settings
) -> None:
    existing_homeserver(homeserver)
    empty = bootstrap_cli(boot_settings, "--status")
    assert empty.returncode == 0 and "no bootstrap has run" in empty.stdout
    processes.env.update(settings_env(boot_settings))
    processes.start_worker()
    assert bootstrap_cli(boot_settings).returncode == 0

    status = bootstrap_cli(boot_settings, "--status")
    assert status.returncode == 0
    assert re.search(r"bootstrap run \d+ \(Synapse's admin room list\): finished", status.stdout)
    assert "3 loaded, 0 waiting, 0 read (in the inbox), 0 failed" in status.stdout
    assert "7 loaded" in status.stdout
    metrics = Metrics()
    with db.connect() as conn:
        metrics.refresh(conn, now_ms())
    text = generate_latest(metrics.registry).decode()
    assert 'directory_bootstrap_rooms{state="loaded"} 3.0' in text
    assert "directory_bootstrap_memberships 7.0" in text
    assert "directory_bootstrap_running 0.0" in text
    assert 'directory_snapshots_total{purpose="bootstrap",result="applied"} 3.0' in text


def test_a_worker_starting_on_an_empty_database_says_so_or_bootstraps(
    db: Engine, homeserver: FakeHomeserver, boot_settings: Settings, redis_client: Any, tmp_path
) -> None:
    existing_homeserver(homeserver)
    quiet = ProcessGroup(boot_settings, tmp_path)
    try:
        quiet.start_worker()
        wait_until(lambda: "the directory knows no room yet" in quiet.log("worker1"), 10)
    finally:
        quiet.kill_all()

    eager = ProcessGroup(with_settings(boot_settings, bootstrap_on_start=True), tmp_path)
    try:
        eager.start_worker("worker2")

        def finished() -> bool:
            with db.connect() as conn:
                return conn.scalar(select(bootstrap_runs.c.finished_at_ms)) is not None

        wait_until(finished, 30, what="the bootstrap run to finish")
        wait_for_no_pending(db)
        assert names(db, BOB, "dave") == {DAVE: "Dave"}
    finally:
        eager.kill_all()
