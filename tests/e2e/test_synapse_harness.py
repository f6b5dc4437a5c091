"""Checks that the real-Synapse testbed works: two federating homeservers, our appservice
registered on the first, transactions reaching it, and profile lookups over federation."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.support.processes import wait_until
from tests.support.synapse import (
    AppserviceRegistration,
    SynapseServer,
    federating_pair,
    random_token,
)

pytestmark = pytest.mark.e2e


class TransactionStub:
    """A minimal appservice endpoint: checks the hs_token, records events, answers {}."""

    def __init__(self, hs_token: str) -> None:
        self.hs_token = hs_token
        self.events: list[dict] = []
        self.txn_ids: list[str] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if not self.path.startswith("/_matrix/app/v1/transactions/"):
                    return self._answer(404, {"errcode": "M_UNRECOGNIZED"})
                if self.headers.get("Authorization") != f"Bearer {stub.hs_token}":
                    return self._answer(403, {"errcode": "M_FORBIDDEN"})
                events = json.loads(body).get("events", [])
                with stub.lock:
                    stub.txn_ids.append(self.path.rsplit("/", 1)[1])
                    stub.events.extend(events)
                return self._answer(200, {})

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep pytest output quiet

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def member_events(self, room_id: str, user_id: str) -> list[dict]:
        with self.lock:
            return [
                e
                for e in self.events
                if e.get("type") == "m.room.member"
                and e.get("room_id") == room_id
                and e.get("state_key") == user_id
            ]


@pytest.fixture
def stub() -> Iterator[TransactionStub]:
    # Started before Synapse: otherwise the first transactions wait for its retry backoff.
    stub = TransactionStub(hs_token=random_token())
    stub.thread.start()
    yield stub
    stub.httpd.shutdown()
    stub.httpd.server_close()


@pytest.fixture
def pair(
    tmp_path: Path, stub: TransactionStub
) -> Iterator[tuple[SynapseServer, SynapseServer, AppserviceRegistration]]:
    registration = AppserviceRegistration(
        url=stub.url, as_token=random_token(), hs_token=stub.hs_token
    )
    hs1, hs2 = federating_pair(tmp_path, registration)
    yield hs1, hs2, registration
    hs1.stop()
    hs2.stop()
    hs1.stop()  # a second stop is harmless


def test_federating_pair_delivers_member_events_to_the_appservice(
    pair: tuple[SynapseServer, SynapseServer, AppserviceRegistration], stub: TransactionStub
) -> None:
    hs1, hs2, registration = pair
    alice = hs2.register("alice", displayname="Alice")
    bob = hs1.register("bob")
    assert alice.user_id == f"@alice:{hs2.server_name}"

    room = alice.create_room(public=True, name="harness check")
    bob.join(room, via=hs2.server_name)
    alice.set_room_displayname(room, "Delia")

    # Bob's join happens on hs1; Alice's per-room rename reaches hs1 over federation.
    # Alice's own earlier join is not replayed to the appservice.
    wait_until(lambda: stub.member_events(room, bob.user_id), 10, what="bob's join")
    delia = wait_until(
        lambda: [
            e
            for e in stub.member_events(room, alice.user_id)
            if e["content"].get("displayname") == "Delia"
        ],
        10,
        what="alice's per-room rename",
    )
    assert delia[0]["content"]["membership"] == "join"
    assert stub.member_events(room, bob.user_id)[0]["content"]["membership"] == "join"

    # hs1 asks hs2 over federation for Alice's global profile: not the per-room name.
    profile = httpx.get(
        f"{hs1.client_url}/_matrix/client/v3/profile/{quote(alice.user_id, safe='')}",
        timeout=15,
    )
    assert profile.status_code == 200, profile.text
    assert profile.json()["displayname"] == "Alice"

    # The appservice can act as local user bob to read the room's members.
    members = httpx.get(
        f"{hs1.client_url}/_matrix/client/v3/rooms/{quote(room, safe='')}/joined_members",
        params={"user_id": bob.user_id},
        headers={"Authorization": f"Bearer {registration.as_token}"},
        timeout=15,
    )
    assert members.status_code == 200, members.text
    joined = members.json()["joined"]
    assert set(joined) == {alice.user_id, bob.user_id}
    assert joined[alice.user_id]["display_name"] == "Delia"
