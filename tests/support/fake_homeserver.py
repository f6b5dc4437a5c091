"""A real HTTP server standing in for HOMESERVER_URL in tests.

It answers `GET /_matrix/client/v3/profile/{userId}` the way our homeserver would after
asking the user's server over federation, so behaviour is set per *server name* (the
part of the user id after the first ':'): latency, a concurrency limit answered with
429, or being down (502, as Synapse answers when the remote is unreachable). Single
users can be scripted with hostile or failing responses, consumed one per request.

It also answers what our service reads of our own homeserver: `whoami` (tokens set with
set_token), a room's current state as a member (`GET /rooms/{roomId}/state?user_id=`,
rooms set with set_room), a user's `joined_rooms`, and Synapse's admin room list and
room state (with the token set by set_admin_token). Those answers can be scripted per
path with script_api.

It runs in a background thread of the test process, so tests script it directly while
Celery worker subprocesses call it over TCP. Every request is recorded.

Scripted responses (a `Scripted` is any of these frozen dataclasses):
    Reply(status, body=None, headers=())   JSON body (any JSON value) with a status
    error(status, errcode, message)        -> Reply with a Matrix error body
    Raw(body, status=200, repeat=1, content_length=True, content_type=..., headers=())
                                           arbitrary bytes, `body` sent `repeat` times
                                           (10 MB without holding 10 MB); without a
                                           Content-Length the connection closes at end
    Hang(seconds, then=None)               wait, then answer `then` or behave normally
    Trickle(body, interval, chunk_size=1, status=200)
                                           full Content-Length, bytes dribbled slowly
    Disconnect()                           close the connection without answering
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.parse
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

PROFILE_PREFIX = "/_matrix/client/v3/profile/"
WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
ROOMS_PREFIX = "/_matrix/client/v3/rooms/"
JOINED_ROOMS_PATH = "/_matrix/client/v3/joined_rooms"
ADMIN_ROOMS_PATH = "/_synapse/admin/v1/rooms"
ADMIN_USERS_PREFIX = "/_synapse/admin/v2/users/"


@dataclass(frozen=True)
class Reply:
    status: int
    body: object = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Raw:
    body: bytes
    status: int = 200
    repeat: int = 1
    content_length: bool = True
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Hang:
    seconds: float
    then: Scripted | None = None


@dataclass(frozen=True)
class Trickle:
    body: bytes
    interval: float
    chunk_size: int = 1
    status: int = 200


@dataclass(frozen=True)
class Disconnect:
    pass


Scripted = Reply | Raw | Hang | Trickle | Disconnect

# Users of this server count as the fake homeserver's own (joined_local_members).
LOCAL_SERVER_NAME = "ours.test"


def error(status: int, errcode: str, message: str) -> Reply:
    return Reply(status, {"errcode": errcode, "error": message})


NOT_FOUND = error(404, "M_NOT_FOUND", "Profile was not found")
BAD_GATEWAY = error(502, "M_UNKNOWN", "Failed to fetch profile")
FORBIDDEN = error(403, "M_FORBIDDEN", "You are not allowed to see this profile")


@dataclass
class RecordedRequest:
    user_id: str
    server_name: str
    started: float
    authorization: str | None
    path: str
    status: int | None = None  # None until answered; stays None if never answered


@dataclass
class _ServerBehaviour:
    latency: float = 0.0
    max_concurrent: int | None = None
    down: bool = False


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    profiles: dict[str, dict[str, object]] = field(default_factory=dict)
    servers: dict[str, _ServerBehaviour] = field(default_factory=dict)
    scripts: dict[str, deque[Scripted]] = field(default_factory=lambda: defaultdict(deque))
    requests: list[RecordedRequest] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rate_limited: int = 0
    connections: set[socket.socket] = field(default_factory=set)
    tokens: dict[str, str] = field(default_factory=dict)
    whoami_calls: int = 0
    rooms: dict[str, FakeRoom] = field(default_factory=dict)
    room_reads: list[tuple[str, str]] = field(default_factory=list)
    # Answers scripted for the room and admin APIs (not profiles), by path, in order.
    api_scripts: dict[str, deque[Scripted]] = field(default_factory=lambda: defaultdict(deque))
    api_requests: list[tuple[str, float]] = field(default_factory=list)
    admin_token: str | None = None
    # Rooms a user's joined_rooms lists beyond the rooms they are a member of.
    extra_joined: dict[str, list[str]] = field(default_factory=dict)
    room_read_latency: float = 0.0
    # Synapse's admin view of local users (GET /_synapse/admin/v2/users/<user_id>).
    accounts: dict[str, dict[str, object]] = field(default_factory=dict)
    account_reads: list[str] = field(default_factory=list)


@dataclass
class FakeRoom:
    """A room's current state as the client API shows it to a member."""

    members: dict[str, dict[str, str]]  # user_id -> {"display_name", "avatar_url"}
    join_rule: str | None = "invite"
    history_visibility: str | None = "shared"
    # Users who left: their member event says so, and they may still read the state
    # as it was when they left (as Synapse lets them).
    departed: tuple[str, ...] = ()

    def state(self) -> list[dict]:
        """The room's current state events, as GET /rooms/{roomId}/state lists them."""
        events: list[dict] = []
        for key, event_type, value in (
            ("join_rule", "m.room.join_rules", self.join_rule),
            ("history_visibility", "m.room.history_visibility", self.history_visibility),
        ):
            if value is not None:
                events.append(_state_event(event_type, "", {key: value}))
        for user_id, profile in self.members.items():
            content: dict[str, object] = {"membership": "join"}
            if "display_name" in profile:
                content["displayname"] = profile["display_name"]
            if "avatar_url" in profile:
                content["avatar_url"] = profile["avatar_url"]
            events.append(_state_event("m.room.member", user_id, content))
        for user_id in self.departed:
            events.append(_state_event("m.room.member", user_id, {"membership": "leave"}))
        return events


def _state_event(event_type: str, state_key: str, content: dict) -> dict:
    return {
        "type": event_type,
        "state_key": state_key,
        "content": content,
        "sender": state_key or "@creator:fake",
        "event_id": f"$fake-{event_type}-{state_key}",
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Handlers may be mid-sleep or parked on an idle keep-alive connection; stop()
    # must not wait for them.
    block_on_close = False
    state: _State

    def handle_error(self, request: object, client_address: object) -> None:
        # A client hanging up mid-response is normal here (timeouts, size caps).
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections end on their own instead of pinning a thread.
    timeout = 10
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.state.lock:
            self.server.state.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.state.lock:
            self.server.state.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        try:
            self._route()
        except OSError:
            # The client went away (timeout, size cap): nothing to answer any more.
            self.close_connection = True

    def _whoami(self) -> None:
        state = self.server.state
        token = self._bearer()
        if self._scripted_api(WHOAMI_PATH):
            return
        with state.lock:
            state.whoami_calls += 1
            user_id = state.tokens.get(token)
        if user_id is None:
            self._send_json(None, 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})
        else:
            self._send_json(None, 200, {"user_id": user_id})

    def _query(self) -> dict[str, str]:
        query = urllib.parse.parse_qs(self.path.partition("?")[2])
        return {key: values[0] for key, values in query.items()}

    def _bearer(self) -> str:
        return self.headers.get("Authorization", "").removeprefix("Bearer ")

    def _scripted_api(self, path: str) -> bool:
        """Play the next answer scripted for this path, if any."""
        state = self.server.state
        with state.lock:
            state.api_requests.append((path, time.monotonic()))
            queue = state.api_scripts.get(path)
            scripted = queue.popleft() if queue else None
        if scripted is None:
            return False
        record = RecordedRequest("", "", time.monotonic(), self.headers.get("Authorization"), path)
        self._play(record, scripted)
        return True

    def _room(self, path: str) -> None:
        state = self.server.state
        as_user = self._query().get("user_id", "")
        room_id, _, rest = urllib.parse.unquote(path[len(ROOMS_PREFIX) :]).partition("/")
        with state.lock:
            state.room_reads.append((room_id, as_user))
            room = state.rooms.get(room_id)
            latency = state.room_read_latency
        if latency and state.stopping.wait(latency):
            return
        if self._scripted_api(path):
            return
        if room is None or (as_user not in room.members and as_user not in room.departed):
            self._send_json(None, 403, {"errcode": "M_FORBIDDEN", "error": "Not in room"})
        elif rest == "state":
            self._send_json(None, 200, room.state())
        else:
            self._send_json(None, 404, {"errcode": "M_NOT_FOUND", "error": "Not found"})

    def _joined_rooms(self) -> None:
        state = self.server.state
        user_id = self._query().get("user_id", "")
        if self._scripted_api(JOINED_ROOMS_PATH):
            return
        with state.lock:
            known = user_id in state.extra_joined or any(
                user_id in room.members or user_id in room.departed for room in state.rooms.values()
            )
            joined = [room_id for room_id, room in state.rooms.items() if user_id in room.members]
            joined += state.extra_joined.get(user_id, [])
        if not known:
            # A user no scripted room mentions: like a homeserver that will not let the
            # appservice act as them, it says nothing (so nothing counts as a leave).
            self._send_json(
                None,
                403,
                {"errcode": "M_FORBIDDEN", "error": "Cannot masquerade as this user"},
            )
            return
        self._send_json(None, 200, {"joined_rooms": joined})

    def _admin(self, path: str) -> None:
        state = self.server.state
        with state.lock:
            admin_token = state.admin_token
        if admin_token is None or self._bearer() != admin_token:
            self._send_json(None, 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})
            return
        if self._scripted_api(path):
            return
        if path == ADMIN_ROOMS_PATH:
            query = self._query()
            start, limit = int(query.get("from", "0")), int(query.get("limit", "100"))
            with state.lock:
                listed = sorted(state.rooms.items())
            page = [
                {
                    "room_id": room_id,
                    "joined_members": len(room.members),
                    "joined_local_members": sum(
                        1 for user in room.members if user.endswith(":" + LOCAL_SERVER_NAME)
                    ),
                    "join_rules": room.join_rule,
                    "history_visibility": room.history_visibility,
                    "public": False,
                }
                for room_id, room in listed[start : start + limit]
            ]
            body: dict[str, object] = {
                "rooms": page,
                "offset": start,
                "total_rooms": len(listed),
            }
            if start + limit < len(listed):
                body["next_batch"] = start + limit
            self._send_json(None, 200, body)
            return
        room_id, _, rest = urllib.parse.unquote(path[len(ADMIN_ROOMS_PATH) + 1 :]).partition("/")
        with state.lock:
            state.room_reads.append((room_id, "admin"))
            room = state.rooms.get(room_id)
            latency = state.room_read_latency
        if latency and state.stopping.wait(latency):
            return
        if room is None or rest != "state":
            self._send_json(None, 404, {"errcode": "M_NOT_FOUND", "error": "Room not found"})
        else:
            self._send_json(None, 200, {"state": room.state()})

    def _admin_user(self, path: str) -> None:
        state = self.server.state
        user_id = urllib.parse.unquote(path[len(ADMIN_USERS_PREFIX) :])
        with state.lock:
            admin_token = state.admin_token
            state.account_reads.append(user_id)
            account = state.accounts.get(user_id)
        if admin_token is None or self._bearer() != admin_token:
            self._send_json(None, 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})
        elif self._scripted_api(path):
            return
        elif not user_id.endswith(":" + LOCAL_SERVER_NAME):
            self._send_json(
                None, 400, {"errcode": "M_UNKNOWN", "error": "Can only look up local users"}
            )
        elif account is None:
            self._send_json(None, 404, {"errcode": "M_NOT_FOUND", "error": "User not found"})
        else:
            self._send_json(None, 200, account)

    def _route(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        if path == WHOAMI_PATH:
            self._whoami()
            return
        if path.startswith(ROOMS_PREFIX):
            self._room(path)
            return
        if path == JOINED_ROOMS_PATH:
            self._joined_rooms()
            return
        if path.startswith(ADMIN_ROOMS_PATH):
            self._admin(path)
            return
        if path.startswith(ADMIN_USERS_PREFIX):
            self._admin_user(path)
            return
        if not path.startswith(PROFILE_PREFIX) or "/" in path[len(PROFILE_PREFIX) :]:
            self._send_json(None, 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized"})
            return
        user_id = urllib.parse.unquote(path[len(PROFILE_PREFIX) :])
        server_name = user_id.partition(":")[2]
        record = RecordedRequest(
            user_id=user_id,
            server_name=server_name,
            started=time.monotonic(),
            authorization=self.headers.get("Authorization"),
            path=self.path,
        )
        with state.lock:
            state.requests.append(record)
            behaviour = state.servers.get(server_name, _ServerBehaviour())
            # Counted before the limit check: this measures what the client attempted.
            state.in_flight[server_name] += 1
            in_flight = state.in_flight[server_name]
            state.max_in_flight[server_name] = max(state.max_in_flight[server_name], in_flight)
            over_limit = (
                behaviour.max_concurrent is not None and in_flight > behaviour.max_concurrent
            )
            if over_limit:
                state.rate_limited += 1
        try:
            if over_limit:
                self._send_json(
                    record,
                    429,
                    {"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests"},
                    headers=(("Retry-After", "1"),),
                )
                return
            if behaviour.latency and state.stopping.wait(behaviour.latency):
                return
            with state.lock:
                queue = state.scripts.get(user_id)
                scripted = queue.popleft() if queue else None
            if scripted is not None:
                self._play(record, scripted)
            else:
                self._normal(record, behaviour)
        finally:
            with state.lock:
                state.in_flight[server_name] -= 1

    def _normal(self, record: RecordedRequest, behaviour: _ServerBehaviour) -> None:
        if behaviour.down:
            self._play(record, BAD_GATEWAY)
            return
        with self.server.state.lock:
            profile = self.server.state.profiles.get(record.user_id)
        if profile is None:
            self._play(record, NOT_FOUND)
        else:
            self._send_json(record, 200, profile)

    def _play(self, record: RecordedRequest, scripted: Scripted) -> None:
        state = self.server.state
        if isinstance(scripted, Reply):
            self._send_json(record, scripted.status, scripted.body, scripted.headers)
        elif isinstance(scripted, Raw):
            self._send_raw(record, scripted)
        elif isinstance(scripted, Hang):
            if state.stopping.wait(scripted.seconds):
                return
            if scripted.then is not None:
                self._play(record, scripted.then)
            else:
                self._normal(record, state.servers.get(record.server_name, _ServerBehaviour()))
        elif isinstance(scripted, Trickle):
            self._send_head(record, scripted.status, "application/json", len(scripted.body))
            step = max(1, scripted.chunk_size)
            for start in range(0, len(scripted.body), step):
                self.wfile.write(scripted.body[start : start + step])
                self.wfile.flush()
                if start + step < len(scripted.body) and state.stopping.wait(scripted.interval):
                    return
        elif isinstance(scripted, Disconnect):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            raise TypeError(f"not a scripted response: {scripted!r}")

    def _send_head(
        self,
        record: RecordedRequest | None,
        status: int,
        content_type: str,
        length: int | None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if record is not None:
            record.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def _send_json(
        self,
        record: RecordedRequest | None,
        status: int,
        body: object,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        data = json.dumps(body).encode()
        self._send_head(record, status, "application/json", len(data), headers)
        self.wfile.write(data)

    def _send_raw(self, record: RecordedRequest, raw: Raw) -> None:
        total = len(raw.body) * raw.repeat
        length = total if raw.content_length else None
        self._send_head(record, raw.status, raw.content_type, length, raw.headers)
        view = memoryview(raw.body)
        for _ in range(raw.repeat):
            self.wfile.write(view)


class FakeHomeserver:
    """Our homeserver's profile endpoint, scriptable per server name and per user."""

    def __init__(self) -> None:
        self._state = _State()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> FakeHomeserver:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._httpd is not None:
            return
        self._state.stopping.clear()
        # Port 0: the kernel picks a free port atomically, no probe-then-bind race.
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.state = self._state
        self._httpd = httpd
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-homeserver",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._state.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        # Wake handlers blocked reading keep-alive connections or writing to slow clients.
        with self._state.lock:
            connections = list(self._state.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    # -- scripting -------------------------------------------------------------------

    def set_profile(
        self,
        user_id: str,
        displayname: str | None = None,
        avatar_url: str | None = None,
        **extra: object,
    ) -> None:
        """The user's public profile; None fields are omitted, as Synapse does.
        `extra`: extended profile fields (MSC4133), e.g.
        `**{"m.user_directory.visibility": "hidden"}`."""
        profile: dict[str, object] = dict(extra)
        if displayname is not None:
            profile["displayname"] = displayname
        if avatar_url is not None:
            profile["avatar_url"] = avatar_url
        with self._state.lock:
            self._state.profiles[user_id] = profile

    def set_token(self, token: str, user_id: str) -> None:
        """`whoami` with this access token answers this user."""
        with self._state.lock:
            self._state.tokens[token] = user_id

    @property
    def whoami_calls(self) -> int:
        with self._state.lock:
            return self._state.whoami_calls

    def set_room(self, room_id: str, room: FakeRoom) -> None:
        with self._state.lock:
            self._state.rooms[room_id] = room

    def remove_room(self, room_id: str) -> None:
        with self._state.lock:
            self._state.rooms.pop(room_id, None)

    def set_admin_token(self, token: str | None) -> None:
        """The admin API accepts this token (None: refuses every token with 401)."""
        with self._state.lock:
            self._state.admin_token = token

    def set_account(
        self,
        user_id: str,
        *,
        user_type: str | None = None,
        deactivated: bool = False,
        locked: bool = False,
        is_guest: bool = False,
    ) -> None:
        """A local user as Synapse's admin API shows them (with the admin token)."""
        account: dict[str, object] = {
            "name": user_id,
            "admin": False,
            "deactivated": deactivated,
            "locked": locked,
            "is_guest": is_guest,
            "user_type": user_type,
            "shadow_banned": False,
        }
        with self._state.lock:
            self._state.accounts[user_id] = account

    @property
    def account_reads(self) -> list[str]:
        """The users the admin API was asked about, in order."""
        with self._state.lock:
            return list(self._state.account_reads)

    def set_extra_joined(self, user_id: str, room_ids: list[str]) -> None:
        with self._state.lock:
            self._state.extra_joined[user_id] = list(room_ids)

    def set_room_read_latency(self, seconds: float) -> None:
        """Every room state read (client or admin API) answers after this long."""
        with self._state.lock:
            self._state.room_read_latency = seconds

    def script_api(self, path: str, *responses: Scripted) -> None:
        """Answer the next requests for this room, admin, joined_rooms or whoami path
        (without query) with these, in order, then behave normally."""
        with self._state.lock:
            self._state.api_scripts[path].extend(responses)

    @property
    def api_requests(self) -> list[str]:
        """Paths of every room, admin, joined_rooms and whoami request, in order."""
        with self._state.lock:
            return [path for path, _ in self._state.api_requests]

    @property
    def api_request_times(self) -> list[tuple[str, float]]:
        """(path, time.monotonic() on arrival) of the same requests."""
        with self._state.lock:
            return list(self._state.api_requests)

    @property
    def room_reads(self) -> list[tuple[str, str]]:
        """(room_id, as_user) of every room state read; as_user "admin" for the admin API."""
        with self._state.lock:
            return list(self._state.room_reads)

    def remove_profile(self, user_id: str) -> None:
        """The user is unknown again: 404 M_NOT_FOUND."""
        with self._state.lock:
            self._state.profiles.pop(user_id, None)

    def set_server(
        self,
        server_name: str,
        *,
        latency: float = 0.0,
        max_concurrent: int | None = None,
        down: bool = False,
    ) -> None:
        """Replace the behaviour of one server name (unset arguments go back to defaults)."""
        with self._state.lock:
            self._state.servers[server_name] = _ServerBehaviour(
                latency=latency, max_concurrent=max_concurrent, down=down
            )

    def script(self, user_id: str, *responses: Scripted) -> None:
        """Answer the user's next requests with these, in order, then behave normally."""
        with self._state.lock:
            self._state.scripts[user_id].extend(responses)

    def clear_scripts(self) -> None:
        with self._state.lock:
            self._state.scripts.clear()

    # -- observing -------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._state.lock:
            return list(self._state.requests)

    def count(self, user_id: str | None = None, server_name: str | None = None) -> int:
        return sum(
            1
            for r in self.requests
            if (user_id is None or r.user_id == user_id)
            and (server_name is None or r.server_name == server_name)
        )

    def max_in_flight(self, server_name: str) -> int:
        """Most requests to that server being handled at once, 429-answered ones included."""
        with self._state.lock:
            return self._state.max_in_flight.get(server_name, 0)

    def rate_limited_count(self) -> int:
        with self._state.lock:
            return self._state.rate_limited

    def in_flight(self, server_name: str) -> int:
        """Requests to that server not yet finished (a handler ends after its reply)."""
        with self._state.lock:
            return self._state.in_flight[server_name]

    def reset_records(self) -> None:
        """Forget requests and counters; profiles, servers and scripts stay."""
        with self._state.lock:
            self._state.requests.clear()
            self._state.max_in_flight.clear()
            self._state.max_in_flight.update(self._state.in_flight)
            self._state.rate_limited = 0
