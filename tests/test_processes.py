"""The three processes as an operator runs them (`python server.py`, `worker.py`,
`beat.py`), wired only by environment variables: a transaction over HTTP ends as a
public profile found by an HTTP search."""

from __future__ import annotations

import httpx
from sqlalchemy import Engine

from directory.config import Settings
from tests.conftest import APPSERVICE_SENDER, SERVER_NAME, with_settings
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.processes import ProcessGroup, wait_until
from tests.support.services import free_port

ALICE = "@alice:remote.test"
BOB = f"@bob:{SERVER_NAME}"


def test_events_over_http_become_searchable_public_profiles(
    db: Engine, redis_client: object, settings: Settings, tmp_path
) -> None:
    with FakeHomeserver() as homeserver:
        port = free_port()
        configured = with_settings(settings, homeserver_url=homeserver.url, http_port=port)
        processes = ProcessGroup(configured, tmp_path)
        try:
            homeserver.set_profile(ALICE, "Alice")
            homeserver.set_token("bob-token", BOB)
            homeserver.set_token(configured.as_token, APPSERVICE_SENDER)
            processes.start_server()
            processes.start_worker()
            processes.start_beat()
            url = f"http://127.0.0.1:{port}"
            events = [
                join_rules("!pub:x", "public"),
                member("!pub:x", BOB),
                member("!pub:x", ALICE, displayname="Pubby"),
            ]
            with httpx.Client(base_url=url, timeout=10) as client:
                put = client.put(
                    "/_matrix/app/v1/transactions/1",
                    json={"events": events},
                    headers={"Authorization": f"Bearer {configured.hs_token}"},
                )
                assert put.status_code == 200

                def alice_found_as() -> str | None:
                    response = client.post(
                        "/_matrix/client/v3/user_directory/search",
                        json={"search_term": "alice"},
                        headers={"Authorization": "Bearer bob-token"},
                    )
                    results = response.json()["results"]
                    return results[0].get("display_name") if results else None

                # Applied by the worker moments after the 200: first the placeholder (or
                # already the public name), never the per-room "Pubby".
                seen: list[str | None] = []

                def public_name_shown() -> bool:
                    seen.append(alice_found_as())
                    return seen[-1] == "Alice"

                wait_until(public_name_shown, 20, what="Alice's public name")
                assert set(seen) <= {None, ALICE, "Alice"}
                health = client.get("/health")
                assert health.status_code == 200
                assert health.json() == {"homeserver": "ok", "database": "ok", "redis": "ok"}
        finally:
            processes.kill_all()
