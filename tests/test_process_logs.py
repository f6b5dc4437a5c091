"""What the three processes log, as an operator runs them: with LOG_FORMAT=json every
line of every process is one JSON object, a fetch's outcome is one line with its
fields, and no token ever reaches a log line, even one a client put in the query
string, in either format."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from directory.config import Settings
from tests.conftest import APPSERVICE_SENDER, SERVER_NAME, with_settings
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.processes import ProcessGroup, wait_until
from tests.support.services import free_port

ALICE = "@alice:remote.test"
BOB = f"@bob:{SERVER_NAME}"
PROCESSES = ("server", "worker1", "beat")


def json_lines(log: str, name: str) -> list[dict]:
    lines = []
    for number, line in enumerate(log.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{name}.log line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message", "process"} <= record.keys(), line
        lines.append(record)
    return lines


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_no_token_reaches_a_log_line_and_json_logs_are_json(
    db: Engine, redis_client: object, settings: Settings, tmp_path: Path, log_format: str
) -> None:
    user_token = f"user-{secrets.token_urlsafe(24)}"
    wrong_token = f"wrong-{secrets.token_urlsafe(24)}"
    with FakeHomeserver() as homeserver:
        port = free_port()
        configured = with_settings(
            settings,
            homeserver_url=homeserver.url,
            http_port=port,
            as_token=f"as-{secrets.token_urlsafe(24)}",
            hs_token=f"hs-{secrets.token_urlsafe(24)}",
            admin_token=f"admin-{secrets.token_urlsafe(24)}",
            log_format=log_format,
        )
        tokens = {
            "AS_TOKEN": configured.as_token,
            "HS_TOKEN": configured.hs_token,
            "ADMIN_TOKEN": configured.admin_token,
            "the user's token": user_token,
            "a wrong token": wrong_token,
        }
        processes = ProcessGroup(configured, tmp_path)
        try:
            homeserver.set_profile(ALICE, "Alice")
            homeserver.set_token(user_token, BOB)
            homeserver.set_token(configured.as_token, APPSERVICE_SENDER)
            processes.start_server()
            processes.start_worker()
            processes.start_beat()
            events = [
                join_rules("!pub:x", "public"),
                member("!pub:x", BOB),
                member("!pub:x", ALICE, displayname="Pubby"),
            ]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                # The homeserver's legacy way: the hs_token in the query string.
                put = client.put(
                    f"/_matrix/app/v1/transactions/1?access_token={configured.hs_token}",
                    json={"events": events},
                )
                assert put.status_code == 200, put.text
                # Percent-encoded parameter names are decoded by the server: redacted too.
                put = client.put(
                    f"/_matrix/app/v1/transactions/2?access%5Ftoken={configured.hs_token}",
                    json={"events": []},
                )
                assert put.status_code == 200, put.text
                refused = client.put(
                    f"/transactions/3?access_token={wrong_token}", json={"events": []}
                )
                assert refused.status_code == 403

                def alice_found() -> bool:
                    response = client.post(
                        f"/_matrix/client/v3/user_directory/search?access_token={user_token}",
                        json={"search_term": "alice"},
                    )
                    assert response.status_code == 200, response.text
                    results = response.json()["results"]
                    return bool(results) and results[0].get("display_name") == "Alice"

                wait_until(alice_found, 20, what="Alice's public name")
                unknown = client.post(
                    f"/_matrix/client/v3/user_directory/search?access_token={wrong_token}",
                    json={"search_term": "alice"},
                )
                assert unknown.status_code == 401
                assert client.get("/health").status_code == 200
            # The fetch's outcome line is written before the answer is committed.
            wait_until(lambda: ALICE in processes.log("worker1"), 10, what="the fetch line")
        finally:
            processes.kill_all()

    logs = {name: processes.log(name) for name in PROCESSES}
    for name, log in logs.items():
        for what, token in tokens.items():
            assert token not in log, f"{what} in {name}.log"
    server_log = logs["server"]
    assert server_log.count("access_token=[redacted]") >= 4
    assert "access%5Ftoken=[redacted]" in server_log

    if log_format == "text":
        # The current look: uvicorn's own lines, ours with time, level and logger.
        assert "INFO:     127.0.0.1:" in server_log
        assert "PUT /_matrix/app/v1/transactions/1?access_token=[redacted] HTTP/1.1" in server_log
        assert f"INFO directory.fetching fetch of {ALICE}: ok in " in logs["worker1"]
        return

    records = {name: json_lines(log, name) for name, log in logs.items()}
    for name, lines in records.items():
        assert lines, f"{name}.log is empty"
        assert {line["process"] for line in lines} == {name.rstrip("1")}
    access = [line for line in records["server"] if line["logger"] == "uvicorn.access"]
    first = next(
        line for line in access if line["path"].startswith("/_matrix/app/v1/transactions/1")
    )
    assert first["path"] == "/_matrix/app/v1/transactions/1?access_token=[redacted]"
    assert (first["method"], first["status_code"], first["level"]) == ("PUT", 200, "INFO")
    assert any(line["message"].startswith("Uvicorn running on") for line in records["server"])

    fetches = [line for line in records["worker1"] if line.get("user_id") == ALICE]
    assert len(fetches) == 1, fetches
    fetch = fetches[0]
    assert fetch["level"] == "INFO" and fetch["logger"] == "directory.fetching"
    assert fetch["server_name"] == "remote.test" and fetch["outcome"] == "ok"
    assert isinstance(fetch["generation"], int) and fetch["duration_ms"] >= 0
    assert fetch["task"] == "tasks.fetch.fetch_destination" and fetch["task_id"]
    # A room's task's lines carry the room.
    room_lines = [
        line
        for line in records["worker1"]
        if line.get("task") == "tasks.events.backfill_room"
        and line["logger"].startswith(("tasks.", "directory."))
    ]
    assert room_lines and all(line["room_id"] == "!pub:x" for line in room_lines)
    # Celery's own lines carry the task too; its banner is one line, not a block.
    received = [line for line in records["worker1"] if line["message"].endswith("received")]
    assert received and all(line.get("task_id") for line in received)
    assert any(line["message"].startswith("celery worker ") for line in records["worker1"])
    assert any("beat: Starting" in line["message"] for line in records["beat"])
