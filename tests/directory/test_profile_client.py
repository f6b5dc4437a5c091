"""Strict, bounded profile fetching (docs/design.md §8, scenarios 11 and 12).

A profile answer either is exactly what the spec allows (OK), a definitive "no"
(404/403), a rate limit, a transient failure, or hostile (INVALID), and whatever the
remote does, one fetch costs bounded time and memory. Runs against a real HTTP server
(FakeHomeserver), no mocks, no database.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from directory.config import Settings
from directory.events import ProfileValue
from directory.profile_client import FetchResult, Outcome, ProfileClient
from directory.text import MAX_DISPLAYNAME_LENGTH
from tests.support.fake_homeserver import (
    BAD_GATEWAY,
    Disconnect,
    FakeHomeserver,
    Hang,
    Raw,
    Reply,
    Trickle,
    error,
)
from tests.support.processes import wait_until
from tests.support.services import free_port

ALICE = "@alice:remote.test"
TIMEOUT = 0.5  # connect and read timeout of the test client, seconds
MAX_BYTES = 64 * 1024
TEN_MB = 10 * 1024 * 1024

MakeClient = Callable[..., ProfileClient]


@pytest.fixture
def homeserver() -> Iterator[FakeHomeserver]:
    with FakeHomeserver() as server:
        yield server


@pytest.fixture
def make_client(homeserver: FakeHomeserver) -> Iterator[MakeClient]:
    """ProfileClients against the fake, with test-sized limits; closed after the test."""
    clients: list[ProfileClient] = []

    def make(**changes: object) -> ProfileClient:
        settings = Settings(
            homeserver_url=homeserver.url,
            as_token="as-secret",
            fetch_quick_retries=0,
            fetch_quick_retry_wait_seconds=0.05,
            fetch_connect_timeout_seconds=TIMEOUT,
            fetch_read_timeout_seconds=TIMEOUT,
            profile_max_bytes=MAX_BYTES,
        )
        client = ProfileClient(dataclasses.replace(settings, **changes))  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: MakeClient) -> ProfileClient:
    return make_client()


def timed_fetch(client: ProfileClient, user_id: str = ALICE) -> tuple[FetchResult, float]:
    started = time.monotonic()
    result = client.fetch(user_id)
    return result, time.monotonic() - started


# -- well-formed answers ------------------------------------------------------------


def test_ok_with_both_fields(homeserver: FakeHomeserver, client: ProfileClient) -> None:
    homeserver.set_profile(ALICE, "Alice", "mxc://remote.test/abc")

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.OK
    assert result.profile == ProfileValue(displayname="Alice", avatar_url="mxc://remote.test/abc")
    assert result.error is None


@pytest.mark.parametrize(
    "body",
    [{}, {"displayname": None, "avatar_url": None}, {"displayname": "Alice"}],
    ids=["absent", "null", "name-only"],
)
def test_absent_or_null_fields_are_none(
    homeserver: FakeHomeserver, client: ProfileClient, body: dict[str, object]
) -> None:
    homeserver.script(ALICE, Reply(200, body))

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.OK
    assert result.profile == ProfileValue(displayname=body.get("displayname"), avatar_url=None)


def test_extra_fields_are_ignored(homeserver: FakeHomeserver, client: ProfileClient) -> None:
    body = {"displayname": "Alice", "m.tz": "Europe/Paris", "io.fancy": {"deep": [1, 2]}}
    homeserver.script(ALICE, Reply(200, body))

    assert client.fetch(ALICE).profile == ProfileValue(displayname="Alice", avatar_url=None)


def test_sends_token_and_encodes_user_id(homeserver: FakeHomeserver, client: ProfileClient) -> None:
    weird = "@we/ird#x?y=1%41:remote.test"
    homeserver.set_profile(weird, "Weird")

    result = client.fetch(weird)

    assert result.profile == ProfileValue(displayname="Weird", avatar_url=None)
    [request] = homeserver.requests
    assert request.user_id == weird
    assert request.server_name == "remote.test"
    assert request.authorization == "Bearer as-secret"
    assert request.path == "/_matrix/client/v3/profile/%40we%2Fird%23x%3Fy%3D1%2541%3Aremote.test"


def test_control_characters_removed_and_non_mxc_avatar_dropped(
    homeserver: FakeHomeserver, client: ProfileClient
) -> None:
    homeserver.script(
        ALICE, Reply(200, {"displayname": " Al\x1bi\x07ce\n", "avatar_url": "https://x/a.png"})
    )

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.OK
    assert result.profile == ProfileValue(displayname="Alice", avatar_url=None)


def test_name_at_the_length_limit_is_accepted(
    homeserver: FakeHomeserver, client: ProfileClient
) -> None:
    name = "a" * MAX_DISPLAYNAME_LENGTH
    homeserver.script(ALICE, Reply(200, {"displayname": name}))

    assert client.fetch(ALICE).profile == ProfileValue(displayname=name, avatar_url=None)


# -- definitive answers and rate limits -----------------------------------------------


def test_unknown_user_is_not_found(homeserver: FakeHomeserver, client: ProfileClient) -> None:
    result = client.fetch("@nobody:remote.test")

    assert result.outcome is Outcome.NOT_FOUND
    assert result.profile is None
    assert result.error is not None and "404" in result.error


def test_forbidden(homeserver: FakeHomeserver, client: ProfileClient) -> None:
    homeserver.set_profile(ALICE, "Alice")
    homeserver.script(
        ALICE, error(403, "M_FORBIDDEN", "Profile lookup over federation is disabled")
    )

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.FORBIDDEN
    assert result.profile is None
    assert result.error is not None and "M_FORBIDDEN" in result.error


def test_unrecognised_endpoint_is_our_homeserver_not_the_user(
    homeserver: FakeHomeserver, client: ProfileClient
) -> None:
    # A proxy or wrong HOMESERVER_URL says nothing about the user.
    homeserver.script(ALICE, error(404, "M_UNRECOGNIZED", "Unrecognized request"))

    result = client.fetch(ALICE)
    assert result.outcome is Outcome.HOMESERVER
    assert "check HOMESERVER_URL" in (result.error or "")


@pytest.mark.parametrize(
    "reply",
    [
        Reply(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"}),
        Raw(b"<html>502 Bad Gateway</html>", status=502, content_type="text/html"),
        Raw(b"", status=503),
    ],
    ids=["401", "bare-502", "bare-503"],
)
def test_our_homeserver_refusing_or_missing_is_not_charged_to_the_user(
    homeserver: FakeHomeserver, client: ProfileClient, reply: Reply | Raw
) -> None:
    # A refused AS_TOKEN, or a proxy in front of a stopped homeserver: nothing is
    # known about the user or their server.
    homeserver.script(ALICE, reply)

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.HOMESERVER
    assert homeserver.count(ALICE) == 1  # not retried on the spot


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            Reply(429, {"errcode": "M_LIMIT_EXCEEDED"}, headers=(("Retry-After", "7"),)),
            7.0,
        ),
        (Reply(429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 2500}), 2.5),
        (Reply(429, {"errcode": "M_LIMIT_EXCEEDED"}), 5.0),
        (Raw(b"<html>slow down</html>", status=429, content_type="text/html"), 5.0),
        (Reply(429, {"retry_after_ms": 10**15}), 3600.0),
    ],
    ids=["header", "json-ms", "default", "not-json", "absurd-capped"],
)
def test_rate_limited(
    homeserver: FakeHomeserver, make_client: MakeClient, reply: Reply | Raw, expected: float
) -> None:
    homeserver.script(ALICE, reply)
    # Rate limits are the caller's to handle, never retried inside the client.
    client = make_client(fetch_quick_retries=2)

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.RATE_LIMITED
    assert result.retry_after_seconds == pytest.approx(expected)
    assert homeserver.count(ALICE) == 1


# -- transient failures, bounded in time ------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [BAD_GATEWAY, error(500, "M_UNKNOWN", "Internal error"), Reply(408, {})],
    ids=["502", "500", "408"],
)
def test_server_errors_are_transient(
    homeserver: FakeHomeserver, client: ProfileClient, reply: Reply
) -> None:
    homeserver.script(ALICE, reply)

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.TRANSIENT
    assert result.error is not None and str(reply.status) in result.error


def test_redirect_is_not_followed(homeserver: FakeHomeserver, client: ProfileClient) -> None:
    homeserver.script(ALICE, Reply(302, {}, headers=(("Location", "http://127.0.0.1:9/x"),)))

    assert client.fetch(ALICE).outcome is Outcome.TRANSIENT
    assert homeserver.count() == 1


def test_our_homeserver_refusing_connections_is_ours(make_client: MakeClient) -> None:
    client = make_client(homeserver_url=f"http://127.0.0.1:{free_port()}")

    result, elapsed = timed_fetch(client)

    assert result.outcome is Outcome.HOMESERVER
    assert result.error is not None and "HOMESERVER_URL" in result.error
    assert elapsed < 2 * TIMEOUT


def test_disconnect_without_answer_is_transient(
    homeserver: FakeHomeserver, client: ProfileClient
) -> None:
    homeserver.script(ALICE, Disconnect())

    assert client.fetch(ALICE).outcome is Outcome.TRANSIENT


class _OneAnswerPerConnection:
    """A server that answers one request per connection with keep-alive promised, then
    closes it while it sits idle, as homeservers and proxies do."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        body = json.dumps({"displayname": "Alice"}).encode()
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                time.sleep(0.05)

    def close(self) -> None:
        self.listener.close()


def test_an_idle_connection_closed_by_the_server_is_replaced_without_a_failure(
    make_client: MakeClient,
) -> None:
    server = _OneAnswerPerConnection()
    try:
        client = make_client(homeserver_url=server.url, fetch_quick_retries=0)
        first = client.fetch(ALICE)
        time.sleep(0.2)  # the server has closed the kept-alive connection by now
        second = client.fetch(ALICE)
    finally:
        server.close()
    assert first.outcome is Outcome.OK and second.outcome is Outcome.OK
    assert server.connections == 2


def test_hang_beyond_read_timeout_is_transient_in_bounded_time(
    homeserver: FakeHomeserver, client: ProfileClient
) -> None:
    homeserver.script(ALICE, Hang(30))

    result, elapsed = timed_fetch(client)

    assert result.outcome is Outcome.TRANSIENT
    assert elapsed < 2 * TIMEOUT + 0.5


def test_slow_trickle_is_cut_off_by_the_total_deadline(
    homeserver: FakeHomeserver, client: ProfileClient
) -> None:
    # Each byte comes well within the read timeout, so only the total deadline stops it.
    body = json.dumps({"displayname": "Alice" * 20}).encode()
    homeserver.script(ALICE, Trickle(body, interval=TIMEOUT / 3))

    result, elapsed = timed_fetch(client)

    assert result.outcome is Outcome.TRANSIENT
    assert "within" in (result.error or "")
    # Deadline (connect + read) plus at most one read-timeout wait for the next byte.
    assert elapsed < 3 * TIMEOUT + 0.5


def test_trickle_within_the_deadline_is_fine(
    homeserver: FakeHomeserver, client: ProfileClient
) -> None:
    homeserver.script(ALICE, Trickle(b'{"displayname": "Alice"}', interval=0.01, chunk_size=4))

    assert client.fetch(ALICE).profile == ProfileValue(displayname="Alice", avatar_url=None)


def test_quick_retry_turns_a_blip_into_ok(
    homeserver: FakeHomeserver, make_client: MakeClient
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    homeserver.script(ALICE, BAD_GATEWAY)
    client = make_client(fetch_quick_retries=1)

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.OK
    assert result.profile == ProfileValue(displayname="Alice", avatar_url=None)
    assert homeserver.count(ALICE) == 2


def test_without_quick_retries_a_blip_is_transient(
    homeserver: FakeHomeserver, make_client: MakeClient
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    homeserver.script(ALICE, BAD_GATEWAY)
    client = make_client(fetch_quick_retries=0)

    assert client.fetch(ALICE).outcome is Outcome.TRANSIENT
    assert homeserver.count(ALICE) == 1


def test_quick_retries_stop_after_the_configured_attempts_with_growing_waits(
    homeserver: FakeHomeserver, make_client: MakeClient
) -> None:
    homeserver.set_server("remote.test", down=True)
    client = make_client(fetch_quick_retries=2, fetch_quick_retry_wait_seconds=0.1)

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.TRANSIENT
    starts = [r.started for r in homeserver.requests]
    assert len(starts) == 3
    first_wait, second_wait = starts[1] - starts[0], starts[2] - starts[1]
    assert 0.1 <= first_wait < second_wait
    assert second_wait >= 0.2


@pytest.mark.parametrize(
    "reply",
    [
        Reply(404, {"errcode": "M_NOT_FOUND"}),
        Reply(403, {"errcode": "M_FORBIDDEN"}),
        Raw(b"not json"),
    ],
    ids=["404", "403", "invalid"],
)
def test_definitive_and_invalid_answers_are_not_retried(
    homeserver: FakeHomeserver, make_client: MakeClient, reply: Reply | Raw
) -> None:
    homeserver.script(ALICE, reply)
    client = make_client(fetch_quick_retries=3)

    client.fetch(ALICE)

    assert homeserver.count(ALICE) == 1


# -- hostile answers: INVALID, bounded memory --------------------------------------------


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "close-delimited"])
def test_ten_megabyte_body_is_invalid_quickly_and_in_bounded_memory(
    homeserver: FakeHomeserver, client: ProfileClient, content_length: bool
) -> None:
    # Repeated 64 KB chunk: the fake streams 10 MB without holding 10 MB itself.
    chunk = b"x" * 65536
    homeserver.script(ALICE, Raw(chunk, repeat=TEN_MB // len(chunk), content_length=content_length))

    tracemalloc.start()
    try:
        result, elapsed = timed_fetch(client)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.outcome is Outcome.INVALID
    assert result.error == f"body larger than {MAX_BYTES} bytes"
    assert elapsed < 2 * TIMEOUT
    # The whole process (client and fake) stayed far below the body's size.
    assert peak < 2 * 1024 * 1024
    # The client hanging up mid-body did not hurt the fake.
    homeserver.set_profile(ALICE, "Alice")
    assert client.fetch(ALICE).outcome is Outcome.OK


def long_name_body(length: int) -> bytes:
    return json.dumps({"displayname": "a" * length}).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "JSON"),
        (b'{"displayname": "Alice"', "JSON"),
        (b'{"displayname": "\xff\xfe"}', "UTF-8"),
        (b"[1, 2, 3]", "list"),
        (b'"Alice"', "str"),
        (b"null", "NoneType"),
        (b"[" * 50_000, "JSON"),
        (b'{"displayname": 5}', "displayname is a int"),
        (b'{"displayname": ["Alice"]}', "displayname is a list"),
        (b'{"displayname": {"text": "Alice"}}', "displayname is a dict"),
        (b'{"displayname": true}', "displayname is a bool"),
        (b'{"displayname": "Alice", "avatar_url": 12}', "avatar_url is a int"),
        (long_name_body(100 * 1024), "larger than"),
        (long_name_body(MAX_DISPLAYNAME_LENGTH + 1), "over"),
        (b'{"displayname": "Ali\\u0000ce"}', "NUL"),
        (b'{"displayname": "Alice", "avatar_url": "mxc://a/b\\u0000"}', "NUL"),
    ],
    ids=[
        "not-json",
        "truncated-json",
        "bad-utf8",
        "json-list",
        "json-string",
        "json-null",
        "deep-nesting",
        "name-int",
        "name-list",
        "name-object",
        "name-bool",
        "avatar-int",
        "name-100kb",
        "name-too-long",
        "name-nul",
        "avatar-nul",
    ],
)
def test_hostile_bodies_are_invalid(
    homeserver: FakeHomeserver, client: ProfileClient, body: bytes, reason: str
) -> None:
    homeserver.script(ALICE, Raw(body))

    result, elapsed = timed_fetch(client)

    assert result.outcome is Outcome.INVALID
    assert result.profile is None
    assert result.error is not None and reason in result.error
    assert len(result.error) <= 200
    assert elapsed < 2 * TIMEOUT


def test_compressed_body_is_invalid(homeserver: FakeHomeserver, client: ProfileClient) -> None:
    # We ask for identity; a gzip body could expand far past the byte cap.
    homeserver.script(ALICE, Raw(b"\x1f\x8b garbage", headers=(("Content-Encoding", "gzip"),)))

    result = client.fetch(ALICE)

    assert result.outcome is Outcome.INVALID
    assert "encoding" in (result.error or "")


def test_token_is_never_logged(
    homeserver: FakeHomeserver, client: ProfileClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    homeserver.script(ALICE, BAD_GATEWAY, Reply(401, {"errcode": "M_UNKNOWN_TOKEN"}))
    homeserver.script("@carol:remote.test", Reply(404, {"errcode": "M_UNRECOGNIZED"}))
    users = (ALICE, ALICE, "@nobody:remote.test", "@carol:remote.test")
    results = [client.fetch(user_id) for user_id in users]

    # The client logs nothing itself: a fetch's one line is directory/fetching.py's,
    # and carries the result's error, which never holds the token either.
    assert not [r for r in caplog.records if r.name == "directory.profile_client"]
    assert [r.outcome for r in results] == [
        Outcome.TRANSIENT,
        Outcome.HOMESERVER,
        Outcome.NOT_FOUND,
        Outcome.HOMESERVER,
    ]
    assert not [r.error for r in results if "as-secret" in (r.error or "")]
    assert "as-secret" not in caplog.text


# -- the fake itself: later end-to-end tests rely on it ---------------------------------


def fetch_concurrently(client: ProfileClient, user_ids: list[str]) -> list[FetchResult]:
    barrier = threading.Barrier(len(user_ids))
    results: list[FetchResult | None] = [None] * len(user_ids)

    def run(index: int) -> None:
        barrier.wait()
        results[index] = client.fetch(user_ids[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(user_ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_fake_counts_concurrency_per_server(
    homeserver: FakeHomeserver, make_client: MakeClient
) -> None:
    homeserver.set_server("slow.test", latency=0.4)
    users = [f"@u{i}:slow.test" for i in range(4)] + ["@v:fast.test"]
    for user in users:
        homeserver.set_profile(user, user)
    client = make_client(fetch_read_timeout_seconds=2.0)

    results = fetch_concurrently(client, users)

    assert [r.outcome for r in results] == [Outcome.OK] * 5
    assert homeserver.max_in_flight("slow.test") == 4
    assert homeserver.max_in_flight("fast.test") == 1
    assert homeserver.count(server_name="slow.test") == 4
    assert homeserver.rate_limited_count() == 0


def test_fake_answers_429_beyond_max_concurrent(
    homeserver: FakeHomeserver, make_client: MakeClient
) -> None:
    homeserver.set_server("busy.test", latency=0.5, max_concurrent=2)
    users = [f"@u{i}:busy.test" for i in range(5)]
    for user in users:
        homeserver.set_profile(user, user)
    client = make_client(fetch_read_timeout_seconds=2.0)

    results = fetch_concurrently(client, users)

    outcomes = sorted(r.outcome.value for r in results)
    assert outcomes == ["ok", "ok", "rate_limited", "rate_limited", "rate_limited"]
    assert all(r.retry_after_seconds == 1.0 for r in results if r.outcome is Outcome.RATE_LIMITED)
    assert homeserver.rate_limited_count() == 3
    assert sorted(r.status for r in homeserver.requests) == [200, 200, 429, 429, 429]
    assert homeserver.max_in_flight("busy.test") >= 3

    # Handlers finish just after the client has their reply.
    wait_until(lambda: homeserver.in_flight("busy.test") == 0, 5, what="handlers to end")
    homeserver.reset_records()
    assert homeserver.rate_limited_count() == 0
    assert homeserver.count() == 0
    assert homeserver.max_in_flight("busy.test") == 0


def test_fake_server_down_answers_502_until_it_comes_back(
    homeserver: FakeHomeserver, client: ProfileClient
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    homeserver.set_server("remote.test", down=True)

    assert client.fetch(ALICE).outcome is Outcome.TRANSIENT
    assert client.fetch("@bob:other.test").outcome is Outcome.NOT_FOUND

    homeserver.set_server("remote.test")
    assert client.fetch(ALICE).outcome is Outcome.OK
    assert [r.status for r in homeserver.requests] == [502, 404, 200]


def test_fake_scripts_are_consumed_in_order(
    homeserver: FakeHomeserver, client: ProfileClient
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    homeserver.script(ALICE, BAD_GATEWAY, Hang(0.05, then=Reply(200, {"displayname": "Later"})))

    assert client.fetch(ALICE).outcome is Outcome.TRANSIENT
    assert client.fetch(ALICE).profile == ProfileValue(displayname="Later", avatar_url=None)
    assert client.fetch(ALICE).profile == ProfileValue(displayname="Alice", avatar_url=None)


def test_fake_stops_promptly_while_handlers_sleep(make_client: MakeClient) -> None:
    server = FakeHomeserver()
    server.start()
    server.script(ALICE, Hang(30))
    client = make_client(homeserver_url=server.url, fetch_read_timeout_seconds=10.0)
    outcome: list[Outcome] = []
    caller = threading.Thread(target=lambda: outcome.append(client.fetch(ALICE).outcome))
    caller.start()
    deadline = time.monotonic() + 2
    while server.count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)

    started = time.monotonic()
    server.stop()

    assert time.monotonic() - started < 1.0
    caller.join(timeout=5)
    assert outcome == [Outcome.TRANSIENT]
