"""Reading rooms from our own homeserver (directory.homeserver) against a real HTTP
server (FakeHomeserver), no mocks: a room's state read as a local member or as an
admin gives its joined members (values cleaned, triggers only) and its publicity,
failing closed on anything malformed; a read that does not show the reader joined is
refused; every failure is one of the four exceptions that say how to react (refused
token, homeserver unavailable or down, rate limited, room unreadable); an answer over
the size cap is refused without being read whole; the admin room list pages to its
end, and joined_rooms and whoami answer what the homeserver says."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from directory import homeserver as homeserver_module
from directory.config import Settings
from directory.events import ProfileValue
from directory.homeserver import (
    HomeserverClient,
    HomeserverDown,
    HomeserverRefused,
    HomeserverUnavailable,
    ListedRoom,
    RateLimited,
    RoomSnapshot,
    RoomUnreadable,
    snapshot_from_state,
)
from tests.conftest import APPSERVICE_SENDER, SERVER_NAME, with_settings
from tests.support.fake_homeserver import (
    ADMIN_ROOMS_PATH,
    JOINED_ROOMS_PATH,
    WHOAMI_PATH,
    Disconnect,
    FakeHomeserver,
    FakeRoom,
    Hang,
    Raw,
    Reply,
    error,
)
from tests.support.services import free_port

ADMIN_TOKEN = "admin-secret"
BOB = f"@bob:{SERVER_NAME}"
EVE = f"@eve:{SERVER_NAME}"
DAVE = f"@dave:{SERVER_NAME}"
ALICE = "@alice:remote.test"
GONE = "@gone:remote.test"
ROOM = "!r:remote.test"
OTHER_ROOM = "!other:remote.test"
# The paths as the client sends them (the room id is one percent-encoded segment) and
# as the fake keys its scripts: the raw path, before unquoting, without the query.
STATE_PATH = "/_matrix/client/v3/rooms/%21r%3Aremote.test/state"
ADMIN_STATE_PATH = "/_synapse/admin/v1/rooms/%21r%3Aremote.test/state"
NOBODY = ProfileValue(None, None)

MakeClient = Callable[..., HomeserverClient]


@pytest.fixture
def make_client(settings: Settings, homeserver: FakeHomeserver) -> Iterator[MakeClient]:
    """HomeserverClients against the fake (ADMIN_TOKEN set), closed after the test."""
    clients: list[HomeserverClient] = []

    def make(**changes: object) -> HomeserverClient:
        options: dict[str, object] = {
            "homeserver_url": homeserver.url,
            "admin_token": ADMIN_TOKEN,
            "fetch_connect_timeout_seconds": 1.0,
        }
        options.update(changes)
        client = HomeserverClient(with_settings(settings, **options))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: MakeClient) -> HomeserverClient:
    return make_client()


def state_event(event_type: str, state_key: str, content: object) -> dict:
    return {"type": event_type, "state_key": state_key, "content": content, "sender": BOB}


def member(user_id: str, membership: str = "join", **content: object) -> dict:
    return state_event("m.room.member", user_id, {"membership": membership, **content})


def join_rules(content: object) -> dict:
    return state_event("m.room.join_rules", "", content)


def history(content: object) -> dict:
    return state_event("m.room.history_visibility", "", content)


# -- room_state: a room as one of its local members sees it ----------------------------


def test_room_state_gives_joined_members_with_cleaned_values_and_publicity(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_room(
        ROOM,
        FakeRoom(
            members={
                BOB: {"display_name": " Bob\x07 ", "avatar_url": "mxc://ours.test/bob"},
                ALICE: {"display_name": "Alice in here", "avatar_url": "https://evil.test/a"},
                EVE: {},
                "not-a-user": {"display_name": "Nobody"},
                "@spaced out:remote.test": {"display_name": "Spaced"},
            },
            join_rule="public",
            history_visibility="world_readable",
            departed=(GONE,),
        ),
    )

    snapshot = client.room_state(ROOM, BOB)

    assert snapshot == RoomSnapshot(
        joined={
            BOB: ProfileValue("Bob", "mxc://ours.test/bob"),
            ALICE: ProfileValue("Alice in here", None),
            EVE: NOBODY,
        },
        join_rule="public",
        history_visibility="world_readable",
    )
    # Read once, acting as the member asked for, at the room's own encoded path.
    assert homeserver.room_reads == [(ROOM, BOB)]
    assert homeserver.api_requests == [STATE_PATH]


def test_room_state_counts_only_join_as_joined(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.script_api(
        STATE_PATH,
        Reply(
            200,
            [
                join_rules({"join_rule": "invite"}),
                history({"history_visibility": "joined"}),
                member(BOB, displayname="Bob"),
                member(ALICE, "leave", displayname="Alice"),
                member(EVE, "invite"),
                member(DAVE, "ban"),
                member(GONE, "knock"),
                member("@x:remote.test\x00", displayname="Control"),
                member("@" + "x" * 300 + ":remote.test"),
                {"type": "m.room.member", "state_key": "@y:remote.test", "content": "join"},
            ],
        ),
    )

    snapshot = client.room_state(ROOM, BOB)

    assert snapshot.joined == {BOB: ProfileValue("Bob", None)}
    assert (snapshot.join_rule, snapshot.history_visibility) == ("invite", "joined")


def test_room_state_with_no_publicity_events_fails_closed(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}, join_rule=None, history_visibility=None))

    snapshot = client.room_state(ROOM, BOB)

    assert snapshot == RoomSnapshot({BOB: NOBODY}, None, None)


def test_room_id_is_sent_as_one_encoded_path_segment(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    odd_room = "!a?b#c&d:remote.test"
    homeserver.set_room(odd_room, FakeRoom(members={BOB: {}}))

    assert client.room_state(odd_room, BOB).joined == {BOB: NOBODY}
    assert homeserver.api_requests == [
        "/_matrix/client/v3/rooms/%21a%3Fb%23c%26d%3Aremote.test/state"
    ]
    assert homeserver.room_reads == [(odd_room, BOB)]


def test_state_read_as_a_departed_member_is_unreadable(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    # The homeserver lets GONE read the state as it was when they left: it answers 200,
    # but the snapshot does not show GONE joined, so it is not the room's current state.
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}, ALICE: {}}, departed=(GONE,)))

    with pytest.raises(RoomUnreadable, match="does not show them joined"):
        client.room_state(ROOM, GONE)
    assert homeserver.room_reads == [(ROOM, GONE)]


def test_state_of_a_room_the_reader_is_not_in_is_unreadable(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))

    # The fake answers 403 M_FORBIDDEN for a stranger and for an unknown room.
    with pytest.raises(RoomUnreadable, match="403 M_FORBIDDEN"):
        client.room_state(ROOM, EVE)
    with pytest.raises(RoomUnreadable, match="403"):
        client.room_state(OTHER_ROOM, BOB)


@pytest.mark.parametrize("status", [403, 404])
def test_403_and_404_are_unreadable_not_a_homeserver_failure(
    homeserver: FakeHomeserver, client: HomeserverClient, status: int
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))
    homeserver.script_api(STATE_PATH, error(status, "M_FORBIDDEN", "no"))

    with pytest.raises(RoomUnreadable) as caught:
        client.room_state(ROOM, BOB)
    assert not isinstance(caught.value, HomeserverUnavailable)
    assert f"HTTP {status} M_FORBIDDEN" in str(caught.value)


# -- snapshot_from_state: malformed state fails closed --------------------------------


MISSING = object()
BAD_PUBLICITY = [
    pytest.param(MISSING, id="missing"),
    pytest.param(None, id="null"),
    pytest.param(5, id="int"),
    pytest.param(["public"], id="list"),
    pytest.param({"public": True}, id="object"),
    pytest.param("pub\x00lic", id="nul"),
    pytest.param("public\n", id="newline"),
    pytest.param("pub\u0085lic", id="c1-control"),
    pytest.param("p" * 65, id="overlong"),
]


@pytest.mark.parametrize("value", BAD_PUBLICITY)
def test_malformed_join_rule_is_none(value: object) -> None:
    content = {} if value is MISSING else {"join_rule": value}
    snapshot = snapshot_from_state(
        [join_rules(content), history({"history_visibility": "world_readable"}), member(BOB)]
    )

    assert snapshot.join_rule is None
    # Only the malformed value is dropped.
    assert snapshot.history_visibility == "world_readable"
    assert snapshot.joined == {BOB: NOBODY}


@pytest.mark.parametrize("value", BAD_PUBLICITY)
def test_malformed_history_visibility_is_none(value: object) -> None:
    content = {} if value is MISSING else {"history_visibility": value}
    snapshot = snapshot_from_state([join_rules({"join_rule": "public"}), history(content)])

    assert snapshot.history_visibility is None
    assert snapshot.join_rule == "public"


@pytest.mark.parametrize("content", [None, "public", ["join_rule", "public"], 7])
def test_publicity_event_whose_content_is_not_an_object_is_none(content: object) -> None:
    snapshot = snapshot_from_state([join_rules(content), history(content)])

    assert (snapshot.join_rule, snapshot.history_visibility) == (None, None)


def test_publicity_of_64_characters_is_kept() -> None:
    value = "p" * 64
    snapshot = snapshot_from_state(
        [join_rules({"join_rule": value}), history({"history_visibility": value})]
    )

    assert (snapshot.join_rule, snapshot.history_visibility) == (value, value)


def test_publicity_events_with_a_state_key_are_not_the_rooms() -> None:
    snapshot = snapshot_from_state(
        [
            state_event("m.room.join_rules", "x", {"join_rule": "public"}),
            state_event("m.room.history_visibility", BOB, {"history_visibility": "shared"}),
            {"type": "m.room.join_rules", "content": {"join_rule": "public"}},
        ]
    )

    assert (snapshot.join_rule, snapshot.history_visibility) == (None, None)


@pytest.mark.parametrize(
    "state", [None, {}, {"state": [member(BOB)]}, "[]", 3, b"[]", (member(BOB),)]
)
def test_state_that_is_not_a_list_gives_an_empty_snapshot(state: object) -> None:
    assert snapshot_from_state(state) == RoomSnapshot({}, None, None)


def test_events_that_are_not_objects_are_skipped() -> None:
    snapshot = snapshot_from_state(
        [
            None,
            5,
            "m.room.member",
            [member(ALICE)],
            member(BOB, displayname="Bob"),
            {"type": "m.room.member"},
            {"state_key": ALICE, "content": {"membership": "join"}},
            join_rules({"join_rule": "knock"}),
        ]
    )

    assert snapshot == RoomSnapshot({BOB: ProfileValue("Bob", None)}, "knock", None)


def test_member_values_are_cleaned() -> None:
    snapshot = snapshot_from_state(
        [
            member(BOB, displayname="\x00 Bob\u200b\x1b ", avatar_url=" mxc://ours.test/b "),
            member(ALICE, displayname=42, avatar_url="mxc://has space/x"),
            member(EVE, displayname="E" * 300, avatar_url=["mxc://ours.test/e"]),
            member(DAVE, displayname="   ", avatar_url="http://ours.test/d"),
        ]
    )

    assert snapshot.joined == {
        BOB: ProfileValue("Bob\u200b", "mxc://ours.test/b"),
        ALICE: NOBODY,
        EVE: ProfileValue("E" * 256, None),
        DAVE: NOBODY,
    }


# -- admin_room_state -------------------------------------------------------------------


def test_admin_room_state_needs_no_reader(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_admin_token(ADMIN_TOKEN)
    homeserver.set_room(
        ROOM,
        FakeRoom(
            members={BOB: {"display_name": "Bob"}, ALICE: {}},
            join_rule="public",
            history_visibility="shared",
            departed=(GONE,),
        ),
    )

    snapshot = client.admin_room_state(ROOM)

    assert snapshot == RoomSnapshot(
        {BOB: ProfileValue("Bob", None), ALICE: NOBODY}, "public", "shared"
    )
    assert homeserver.room_reads == [(ROOM, "admin")]


def test_admin_room_state_of_an_unknown_room_is_unreadable(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_admin_token(ADMIN_TOKEN)

    with pytest.raises(RoomUnreadable, match="404 M_NOT_FOUND"):
        client.admin_room_state(ROOM)


def test_admin_token_refused_names_admin_token(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_admin_token("some-other-token")

    for call in (client.admin_room_state, lambda _room: client.admin_rooms(None, 10)):
        with pytest.raises(HomeserverRefused) as caught:
            call(ROOM)
        message = str(caught.value)
        assert "ADMIN_TOKEN" in message
        assert "AS_TOKEN" not in message
        assert ADMIN_TOKEN not in message


def test_admin_calls_without_admin_token_send_nothing(
    homeserver: FakeHomeserver, make_client: MakeClient
) -> None:
    homeserver.set_admin_token(ADMIN_TOKEN)
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))
    client = make_client(admin_token="")

    calls: list[Callable[[], object]] = [
        lambda: client.admin_room_state(ROOM),
        lambda: client.admin_rooms(None, 10),
        lambda: client.whoami(admin=True),
    ]
    for call in calls:
        with pytest.raises(HomeserverRefused, match="ADMIN_TOKEN is not set"):
            call()
    assert homeserver.api_requests == []
    assert homeserver.room_reads == []
    assert homeserver.whoami_calls == 0


# -- failures: one exception per reaction ----------------------------------------------


def test_401_names_as_token(homeserver: FakeHomeserver, make_client: MakeClient) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))
    homeserver.script_api(STATE_PATH, error(401, "M_UNKNOWN_TOKEN", "Unknown token"))
    client = make_client()

    with pytest.raises(HomeserverRefused) as caught:
        client.room_state(ROOM, BOB)
    message = str(caught.value)
    assert "AS_TOKEN" in message and "ADMIN_TOKEN" not in message
    assert "M_UNKNOWN_TOKEN" in message
    assert "as-secret" not in message

    # The fake's own whoami refuses a token it does not know, the same way.
    with pytest.raises(HomeserverRefused, match="AS_TOKEN"):
        make_client(as_token="wrong-token").whoami()


def test_refused_connection_is_homeserver_down_quickly(make_client: MakeClient) -> None:
    client = make_client(homeserver_url=f"http://127.0.0.1:{free_port()}")

    started = time.monotonic()
    with pytest.raises(HomeserverDown) as caught:
        client.room_state(ROOM, BOB)
    assert time.monotonic() - started < 2.0
    assert isinstance(caught.value, HomeserverUnavailable)
    assert "cannot reach the homeserver" in str(caught.value)

    for call in (client.whoami, lambda: client.joined_rooms(BOB)):
        with pytest.raises(HomeserverDown):
            call()


def test_disconnect_without_answer_is_homeserver_down(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))
    homeserver.script_api(STATE_PATH, Disconnect())

    with pytest.raises(HomeserverDown):
        client.room_state(ROOM, BOB)


def test_read_timeout_is_homeserver_down(
    homeserver: FakeHomeserver, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(homeserver_module, "READ_TIMEOUT_SECONDS", 0.3)
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))
    homeserver.script_api(STATE_PATH, Hang(10.0))
    client = make_client()

    started = time.monotonic()
    with pytest.raises(HomeserverDown, match="ReadTimeout"):
        client.room_state(ROOM, BOB)
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_with_matrix_error_is_unavailable_not_down(
    homeserver: FakeHomeserver, client: HomeserverClient, status: int
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))
    homeserver.script_api(STATE_PATH, error(status, "M_UNKNOWN", "Internal server error"))

    with pytest.raises(HomeserverUnavailable) as caught:
        client.room_state(ROOM, BOB)
    assert not isinstance(caught.value, HomeserverDown)
    assert f"HTTP {status} M_UNKNOWN" in str(caught.value)


def test_bare_502_is_unavailable_not_down(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))
    homeserver.script_api(
        STATE_PATH, Raw(b"<html>Bad Gateway</html>", 502, content_type="text/html")
    )

    with pytest.raises(HomeserverUnavailable) as caught:
        client.room_state(ROOM, BOB)
    assert not isinstance(caught.value, HomeserverDown)
    assert str(caught.value).endswith("HTTP 502")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>hello</html>", id="html"),
        pytest.param(b"", id="empty"),
        pytest.param(b'[{"type": "m.room.member"', id="truncated"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
    ],
)
def test_200_that_is_not_json_is_unavailable(
    homeserver: FakeHomeserver, client: HomeserverClient, body: bytes
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))
    homeserver.script_api(STATE_PATH, Raw(body))

    with pytest.raises(HomeserverUnavailable, match="not JSON") as caught:
        client.room_state(ROOM, BOB)
    assert not isinstance(caught.value, HomeserverDown)


def test_429_is_rate_limited_for_as_long_as_asked(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))
    homeserver.script_api(
        STATE_PATH,
        Reply(429, {"errcode": "M_LIMIT_EXCEEDED", "error": "Slow down"}, (("Retry-After", "3"),)),
        Reply(429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1500}),
    )

    with pytest.raises(RateLimited) as caught:
        client.room_state(ROOM, BOB)
    assert caught.value.retry_after == 3
    assert "M_LIMIT_EXCEEDED" in str(caught.value)

    # Without the header, the body's retry_after_ms.
    with pytest.raises(RateLimited) as caught:
        client.room_state(ROOM, BOB)
    assert caught.value.retry_after == 1.5

    # The scripts are used up: the room reads normally again.
    assert client.room_state(ROOM, BOB).joined == {BOB: NOBODY}


def test_admin_403_is_unreadable(homeserver: FakeHomeserver, client: HomeserverClient) -> None:
    # Synapse answers a token that is not a server admin's with 403 M_FORBIDDEN.
    homeserver.set_admin_token(ADMIN_TOKEN)
    homeserver.script_api(ADMIN_ROOMS_PATH, error(403, "M_FORBIDDEN", "You are not a server admin"))

    with pytest.raises(RoomUnreadable, match="403 M_FORBIDDEN"):
        client.admin_rooms(None, 10)


# -- the size cap -------------------------------------------------------------------


def padded_state(size: int) -> bytes:
    """BOB's room state as JSON, padded with whitespace to exactly `size` bytes."""
    body = json.dumps([member(BOB, displayname="Bob")]).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "streamed"])
def test_answer_at_the_cap_is_read_and_one_byte_more_is_refused(
    homeserver: FakeHomeserver,
    client: HomeserverClient,
    monkeypatch: pytest.MonkeyPatch,
    content_length: bool,
) -> None:
    monkeypatch.setattr(homeserver_module, "MAX_STATE_BYTES", 1000)
    homeserver.script_api(
        STATE_PATH,
        Raw(padded_state(1000), content_length=content_length),
        Raw(padded_state(1001), content_length=content_length),
    )

    assert client.room_state(ROOM, BOB).joined == {BOB: ProfileValue("Bob", None)}
    with pytest.raises(HomeserverUnavailable, match="over 1000") as caught:
        client.room_state(ROOM, BOB)
    assert not isinstance(caught.value, HomeserverDown)


def test_a_room_bigger_than_the_cap_is_refused(
    homeserver: FakeHomeserver,
    client: HomeserverClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(homeserver_module, "MAX_STATE_BYTES", 1000)
    members = {f"@user{i}:remote.test": {"display_name": f"User {i}"} for i in range(50)}
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}, **members}))
    homeserver.set_admin_token(ADMIN_TOKEN)

    with pytest.raises(HomeserverUnavailable, match="over 1000"):
        client.room_state(ROOM, BOB)
    with pytest.raises(HomeserverUnavailable, match="over 1000"):
        client.admin_room_state(ROOM)


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "streamed"])
def test_huge_answer_is_refused_without_reading_it_all(
    homeserver: FakeHomeserver,
    client: HomeserverClient,
    monkeypatch: pytest.MonkeyPatch,
    content_length: bool,
) -> None:
    monkeypatch.setattr(homeserver_module, "MAX_STATE_BYTES", 1000)
    # 1 GiB of whitespace: reading it whole would take seconds and a gigabyte.
    homeserver.script_api(
        STATE_PATH, Raw(b" " * 65536, repeat=16 * 1024, content_length=content_length)
    )

    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(HomeserverUnavailable, match="over 1000"):
            client.room_state(ROOM, BOB)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 8 * 1024 * 1024


# -- admin_rooms: the admin room list, page by page --------------------------------------


def test_admin_rooms_pages_to_the_end(homeserver: FakeHomeserver, client: HomeserverClient) -> None:
    homeserver.set_admin_token(ADMIN_TOKEN)
    homeserver.set_room("!a:remote.test", FakeRoom(members={BOB: {}, EVE: {}, ALICE: {}}))
    homeserver.set_room("!b:remote.test", FakeRoom(members={ALICE: {}}))
    homeserver.set_room("!c:remote.test", FakeRoom(members={DAVE: {}}))
    homeserver.set_room("!d:remote.test", FakeRoom(members={}))
    homeserver.set_room("!e:remote.test", FakeRoom(members={BOB: {}, GONE: {}}))

    pages = []
    start: str | None = None
    while True:
        page = client.admin_rooms(start, 2)
        pages.append(page)
        assert page.total_rooms == 5
        if page.next_batch is None:
            break
        start = page.next_batch
        assert len(pages) < 10, "the room list never ends"

    assert [page.next_batch for page in pages] == ["2", "4", None]
    assert [page.rooms for page in pages] == [
        [ListedRoom("!a:remote.test", 2), ListedRoom("!b:remote.test", 0)],
        [ListedRoom("!c:remote.test", 1), ListedRoom("!d:remote.test", 0)],
        [ListedRoom("!e:remote.test", 1)],
    ]
    assert homeserver.api_requests == [ADMIN_ROOMS_PATH] * 3


def test_admin_rooms_of_an_empty_server(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_admin_token(ADMIN_TOKEN)

    page = client.admin_rooms(None, 100)

    assert (page.rooms, page.next_batch, page.total_rooms) == ([], None, 0)


def test_admin_rooms_skips_malformed_entries(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_admin_token(ADMIN_TOKEN)
    homeserver.script_api(
        ADMIN_ROOMS_PATH,
        Reply(
            200,
            {
                "rooms": [
                    {"room_id": "!a:remote.test", "joined_local_members": 3},
                    {"room_id": 5, "joined_local_members": 1},
                    "!b:remote.test",
                    None,
                    {"joined_local_members": 1},
                    # Unknown local count: listed as having one (read rather than skip).
                    {"room_id": "!c:remote.test"},
                    {"room_id": "!d:remote.test", "joined_local_members": "2"},
                    {"room_id": "!e:remote.test", "joined_local_members": 0},
                ],
                "next_batch": "s1",
                "total_rooms": "many",
            },
        ),
    )

    page = client.admin_rooms("s0", 10)

    assert page.rooms == [
        ListedRoom("!a:remote.test", 3),
        ListedRoom("!c:remote.test", 1),
        ListedRoom("!d:remote.test", 1),
        ListedRoom("!e:remote.test", 0),
    ]
    assert (page.next_batch, page.total_rooms) == ("s1", None)


@pytest.mark.parametrize(
    "body", [{}, {"rooms": None}, {"rooms": {"!a:remote.test": {}}}, [], "rooms"]
)
def test_admin_rooms_without_a_rooms_array_is_unavailable(
    homeserver: FakeHomeserver, client: HomeserverClient, body: object
) -> None:
    homeserver.set_admin_token(ADMIN_TOKEN)
    homeserver.script_api(ADMIN_ROOMS_PATH, Reply(200, body))

    with pytest.raises(HomeserverUnavailable, match="no rooms array"):
        client.admin_rooms(None, 10)


# -- joined_rooms and whoami --------------------------------------------------------------


def test_joined_rooms_lists_the_users_rooms(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}, ALICE: {}}))
    homeserver.set_room(OTHER_ROOM, FakeRoom(members={ALICE: {}}, departed=(BOB,)))
    homeserver.set_room("!third:remote.test", FakeRoom(members={EVE: {}}))
    homeserver.set_extra_joined(BOB, ["!extra:remote.test"])

    assert sorted(client.joined_rooms(BOB)) == ["!extra:remote.test", ROOM]
    assert sorted(client.joined_rooms(ALICE)) == [OTHER_ROOM, ROOM]
    assert homeserver.api_requests == [JOINED_ROOMS_PATH, JOINED_ROOMS_PATH]


def test_joined_rooms_of_a_user_we_may_not_act_as_is_unreadable(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_room(ROOM, FakeRoom(members={BOB: {}}))

    with pytest.raises(RoomUnreadable, match="403 M_FORBIDDEN"):
        client.joined_rooms(DAVE)


def test_joined_rooms_keeps_only_room_id_strings(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.script_api(
        JOINED_ROOMS_PATH,
        Reply(200, {"joined_rooms": [ROOM, 5, None, {"room_id": "x"}, OTHER_ROOM]}),
    )

    assert client.joined_rooms(BOB) == [ROOM, OTHER_ROOM]


@pytest.mark.parametrize("body", [{}, {"joined_rooms": None}, {"joined_rooms": ROOM}, [ROOM], None])
def test_joined_rooms_without_a_list_is_unavailable(
    homeserver: FakeHomeserver, client: HomeserverClient, body: object
) -> None:
    homeserver.script_api(JOINED_ROOMS_PATH, Reply(200, body))

    with pytest.raises(HomeserverUnavailable, match="without a joined_rooms array"):
        client.joined_rooms(BOB)


def test_whoami_answers_the_appservice_sender(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    assert client.whoami() == APPSERVICE_SENDER
    assert homeserver.whoami_calls == 1


def test_whoami_as_admin_uses_the_admin_token(
    homeserver: FakeHomeserver, client: HomeserverClient
) -> None:
    homeserver.set_token(ADMIN_TOKEN, f"@admin:{SERVER_NAME}")

    assert client.whoami(admin=True) == f"@admin:{SERVER_NAME}"
    assert client.whoami() == APPSERVICE_SENDER


@pytest.mark.parametrize("body", [{}, {"user_id": 5}, {"user_id": None}, ["@a:b"], "x"])
def test_whoami_without_a_user_id_is_unavailable(
    homeserver: FakeHomeserver, client: HomeserverClient, body: object
) -> None:
    homeserver.script_api(WHOAMI_PATH, Reply(200, body))

    with pytest.raises(HomeserverUnavailable, match="without a user_id"):
        client.whoami()
