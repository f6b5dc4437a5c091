"""Our three processes registered as an appservice on real Synapse homeservers."""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from directory.config import Settings
from tests.conftest import with_settings
from tests.support.processes import ProcessGroup, wait_until
from tests.support.services import free_port
from tests.support.synapse import (
    AppserviceRegistration,
    MatrixUser,
    SynapseServer,
    plan_federating_pair,
    random_token,
    start_servers,
)


@dataclass
class Deployment:
    hs1: SynapseServer
    hs2: SynapseServer | None
    processes: ProcessGroup
    url: str
    engine: Engine

    def search(self, user: MatrixUser, term: str, limit: int = 10) -> dict[str, Any]:
        """Our search endpoint, called with the user's own access token."""
        response = httpx.post(
            f"{self.url}/_matrix/client/v3/user_directory/search",
            json={"search_term": term, "limit": limit},
            headers={"Authorization": f"Bearer {user.access_token}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        return response.json()

    def names(self, user: MatrixUser, term: str) -> dict[str, str | None]:
        # A placeholder has no display_name (None here).
        results = self.search(user, term)["results"]
        return {hit["user_id"]: hit.get("display_name") for hit in results}

    def wait_for_names(
        self, user: MatrixUser, term: str, expected: dict[str, str], timeout: float = 30
    ) -> None:
        wait_until(
            lambda: self.names(user, term) == expected,
            timeout,
            interval=0.3,
            what=f"{user.user_id} searching {term!r} to find {expected} "
            f"(last: {self.names(user, term)})",
        )


def _our_settings(settings: Settings, hs1: SynapseServer, port: int, reg: AppserviceRegistration):
    return with_settings(
        settings,
        server_name=hs1.server_name,
        homeserver_url=hs1.client_url,
        as_token=reg.as_token,
        hs_token=reg.hs_token,
        http_port=port,
        search_rate_burst=1000,
        token_cache_seconds=300,
        # Synapse answers a dead remote's profile with 502 after ~0.3 s, a hung one after
        # 10 s; keep retries quick so the test sees the backoff converge in seconds.
        fetch_read_timeout_seconds=15,
        max_fetch_attempts=30,
        # JSON, so that the teardown also checks every line of every process parses.
        log_format="json",
    )


def _our_processes(settings: Settings, tmp_path: Path) -> ProcessGroup:
    """Our processes' group (none started yet), logging under tmp_path/ours."""
    (tmp_path / "ours").mkdir()
    return ProcessGroup(settings, tmp_path / "ours")


def _access_tokens(server: SynapseServer) -> dict[str, str]:
    """Every access token the homeserver issued (users, the admin), by whose it is."""
    database = server.workdir / "homeserver.db"
    if not database.exists():
        return {}
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT user_id, token FROM access_tokens").fetchall()
    finally:
        conn.close()
    return {token: f"{user_id}'s access token" for user_id, token in rows}


def _send_tokens_in_query_strings(
    processes: ProcessGroup, url: str, settings: Settings, user_tokens: dict[str, str]
) -> None:
    """The legacy ways a token reaches us: the homeserver's hs_token and a user's access
    token as `?access_token=`, which the access log must not print."""
    if "server" not in processes.processes or processes.processes["server"].poll() is not None:
        return
    put = httpx.put(
        f"{url}/_matrix/app/v1/transactions/log-check-{secrets.token_hex(4)}",
        params={"access_token": settings.hs_token},
        json={"events": []},
        timeout=10,
    )
    assert put.status_code == 200, put.text
    for token in list(user_tokens)[:1]:
        search = httpx.post(
            f"{url}/_matrix/client/v3/user_directory/search",
            params={"access_token": token},
            json={"search_term": "nobody"},
            timeout=10,
        )
        assert search.status_code == 200, search.text


def assert_no_secret_in_our_logs(logdir: Path, secrets_used: dict[str, str]) -> None:
    """No line our processes wrote holds a token or secret the deployment used, and
    every line is JSON (LOG_FORMAT=json)."""
    found: list[str] = []
    not_json: list[str] = []
    logs = sorted(logdir.glob("*.log"))
    assert logs, f"no logs under {logdir}"
    for log in logs:
        text = log.read_text(errors="replace")
        lines = text.splitlines()
        if not text.endswith("\n") and lines:
            lines.pop()  # cut short by SIGKILL
        for number, line in enumerate(lines, 1):
            for secret, what in secrets_used.items():
                if secret and secret in line:
                    found.append(f"{log.name}:{number}: {what}")
            try:
                json.loads(line)
            except ValueError:
                not_json.append(f"{log.name}:{number}: {line[:200]!r}")
    assert not found, "secrets in our logs:\n" + "\n".join(found)
    assert not not_json, "lines that are not JSON:\n" + "\n".join(not_json[:20])


def _check_our_logs(
    processes: ProcessGroup | None,
    url: str,
    settings: Settings,
    hs1: SynapseServer,
    hs2: SynapseServer | None = None,
) -> None:
    """At teardown: tokens in query strings once more, then every line of our logs
    searched for every token the deployment used (HS_TOKEN, AS_TOKEN, ADMIN_TOKEN, every
    access token either homeserver issued)."""
    if processes is None:
        return
    ours = _access_tokens(hs1)
    issued = {**(_access_tokens(hs2) if hs2 is not None else {}), **ours}
    try:
        _send_tokens_in_query_strings(processes, url, settings, ours)
    finally:
        processes.kill_all()
    used = {
        settings.hs_token: "HS_TOKEN",
        settings.as_token: "AS_TOKEN",
        settings.admin_token: "ADMIN_TOKEN",
        **issued,
    }
    assert_no_secret_in_our_logs(processes.logdir, used)


def _start_ours(processes: ProcessGroup) -> None:
    processes.start_server()
    processes.start_worker()
    processes.start_beat()


def _start(
    settings: Settings, db: Engine, tmp_path: Path, servers: tuple[SynapseServer, ...], port: int
) -> tuple[ProcessGroup, str]:
    # Ours first: Synapse's first transactions would otherwise wait for its retry backoff.
    processes = _our_processes(settings, tmp_path)
    _start_ours(processes)
    start_servers(*servers)
    return processes, f"http://127.0.0.1:{port}"


def _federation(
    settings: Settings, db: Engine, tmp_path: Path, **hs1_config: object
) -> Iterator[Deployment]:
    """Two federating homeservers, ours registered on hs1 (`hs1_config`: extra Synapse
    settings for hs1), and our processes; logs checked at teardown."""
    port = free_port()
    reg = AppserviceRegistration(
        url=f"http://127.0.0.1:{port}", as_token=random_token(), hs_token=random_token()
    )
    hs1, hs2 = plan_federating_pair(tmp_path / "synapse", reg)
    hs1.extra_config.update(hs1_config)
    ours = _our_settings(settings, hs1, port, reg)
    processes, url = _start(ours, db, tmp_path, (hs1, hs2), port)
    try:
        yield Deployment(hs1, hs2, processes, url, db)
        _check_our_logs(processes, url, ours, hs1, hs2)
    finally:
        processes.kill_all()
        hs1.stop()
        hs2.stop()


@pytest.fixture
def federation(
    settings: Settings, db: Engine, redis_client: object, tmp_path: Path
) -> Iterator[Deployment]:
    yield from _federation(settings, db, tmp_path)


@pytest.fixture
def federation_with_guests(
    settings: Settings, db: Engine, redis_client: object, tmp_path: Path
) -> Iterator[Deployment]:
    """`federation`, with guests allowed on hs1 (allow_guest_access: true)."""
    yield from _federation(settings, db, tmp_path, allow_guest_access=True)


@pytest.fixture
def single(
    settings: Settings, db: Engine, redis_client: object, tmp_path: Path
) -> Iterator[Deployment]:
    port = free_port()
    reg = AppserviceRegistration(
        url=f"http://127.0.0.1:{port}", as_token=random_token(), hs_token=random_token()
    )
    hs = SynapseServer(tmp_path / "synapse", "localhost", free_port(), appservice=reg)
    ours = _our_settings(settings, hs, port, reg)
    processes, url = _start(ours, db, tmp_path, (hs,), port)
    try:
        yield Deployment(hs, None, processes, url, db)
        _check_our_logs(processes, url, ours, hs)
    finally:
        processes.kill_all()
        hs.stop()


@dataclass
class LateRegistration:
    """Two federating homeservers already running WITHOUT our appservice, and nothing
    of ours started: what an operator installing the directory on a living homeserver
    finds. register() then does the installation."""

    hs1: SynapseServer
    hs2: SynapseServer
    registration: AppserviceRegistration
    # Ours, for hs1; ADMIN_TOKEN is added by register().
    settings: Settings
    engine: Engine
    tmp_path: Path
    processes: ProcessGroup | None = None

    def register(self, admin: MatrixUser) -> Deployment:
        """Register the appservice on hs1 (restarting it), then start our processes,
        configured with `admin`'s token for the bootstrap."""
        assert self.processes is None, "registered already"
        self.hs1.register_appservice(self.registration)
        self.settings = with_settings(self.settings, admin_token=admin.access_token)
        # Kept before anything starts, so the fixture kills whatever did if one fails.
        self.processes = _our_processes(self.settings, self.tmp_path)
        _start_ours(self.processes)
        url = f"http://127.0.0.1:{self.settings.http_port}"
        return Deployment(self.hs1, self.hs2, self.processes, url, self.engine)


@pytest.fixture
def late_registration(
    settings: Settings, db: Engine, redis_client: object, tmp_path: Path
) -> Iterator[LateRegistration]:
    port = free_port()
    reg = AppserviceRegistration(
        url=f"http://127.0.0.1:{port}", as_token=random_token(), hs_token=random_token()
    )
    hs1, hs2 = plan_federating_pair(tmp_path / "synapse", appservice=None)
    start_servers(hs1, hs2)
    testbed = LateRegistration(hs1, hs2, reg, _our_settings(settings, hs1, port, reg), db, tmp_path)
    try:
        yield testbed
        url = f"http://127.0.0.1:{testbed.settings.http_port}"
        _check_our_logs(testbed.processes, url, testbed.settings, hs1, hs2)
    finally:
        if testbed.processes is not None:
            testbed.processes.kill_all()
        hs1.stop()
        hs2.stop()
