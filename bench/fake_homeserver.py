"""The benchmark's homeserver: many remote servers behind one HOMESERVER_URL.

Runs as its own process (`python -m bench.fake_homeserver --port N`) on a single
asyncio loop with a minimal HTTP/1.1 parser: 20,000 users x 50 ms with hundreds of
requests in flight would make a thread-per-request server (and the GIL it shares with
the harness) the bottleneck we measure instead of the service.

It answers, as our own homeserver would after asking over federation:
- GET  /_matrix/client/v3/profile/{userId}: after LATENCY, the public profile derived
  from the user id (bench.population.public_profile); 429 M_LIMIT_EXCEEDED at once to
  any request beyond MAX_CONCURRENT in flight for that user's server.
- GET  /_matrix/client/v3/account/whoami: token "bench:@user:server" is that user;
  AS_TOKEN (from the environment, as the service's) is @userdirectory:LOCAL_SERVER,
  ADMIN_TOKEN @admin:LOCAL_SERVER.
- GET  /_matrix/client/v3/rooms/...: 403, so a room backfill reads nothing and leaves
  what events said (the benchmark's rooms are fully described by their events).
- GET  /_synapse/admin/v1/rooms?limit=&from=: the generated homeserver's rooms
  (bench/roomset.py), a page at a time as Synapse pages them (`from` an offset,
  `next_batch` absent on the last page); GET /_synapse/admin/v1/rooms/{roomId}/state:
  its current state. Only with ADMIN_TOKEN (401 for an unknown token, 403 for AS_TOKEN,
  which is not a server admin's). Each state body is generated when asked for (about
  0.1 ms), so 10,000 reads cost the loop a second or two in all.
Control (harness only):
- GET  /_bench/stats   requests, 429s and peak concurrency per server, requests per
                       user, room reads, every request to "our homeserver" by kind
- POST /_bench/reset   zero the counters
- POST /_bench/config  {"latency_ms": float, "max_concurrent": int}
- POST /_bench/profiles {"@u:s": version, ...}: later global renames
- POST /_bench/rooms   {"rooms", "members", "users", "servers", "seed"}: the generated
                       homeserver the admin API serves ({"rooms": 0}: none)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.parse
from collections import defaultdict
from typing import Any

from bench.population import LOCAL_SERVER, public_profile
from bench.roomset import GeneratedRooms, RoomSpec

try:  # the service's own dependency: ten times faster on 20 KB state bodies
    import orjson

    def _encode(body: object) -> bytes:
        return orjson.dumps(body)
except ImportError:  # pragma: no cover

    def _encode(body: object) -> bytes:
        return json.dumps(body).encode()


PROFILE_PREFIX = "/_matrix/client/v3/profile/"
WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
ROOMS_PREFIX = "/_matrix/client/v3/rooms/"
ADMIN_PREFIX = "/_synapse/admin/"
ADMIN_ROOMS = "/_synapse/admin/v1/rooms"
# The tokens the service is configured with (the harness starts us with its env).
AS_TOKEN = os.environ.get("AS_TOKEN", "")
ADMIN_TOKEN = os.environ.get("ADMIN_TOKEN", "")
AS_USER = f"@userdirectory:{LOCAL_SERVER}"
ADMIN_USER = f"@admin:{LOCAL_SERVER}"
# Synapse's default page of the admin room list.
DEFAULT_ROOMS_LIMIT = 100
# Requests larger than this are not ours: refuse instead of buffering.
MAX_BODY_BYTES = 64 * 1024 * 1024
# An idle keep-alive connection is closed after this, so a dead client frees its task.
IDLE_SECONDS = 120.0


class State:
    def __init__(self) -> None:
        self.latency = 0.05
        self.max_concurrent = 3
        self.versions: dict[str, int] = {}
        self.rooms: GeneratedRooms | None = None
        self.reset()

    def reset(self) -> None:
        self.requests: dict[str, int] = defaultdict(int)
        self.rate_limited: dict[str, int] = defaultdict(int)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.max_in_flight: dict[str, int] = defaultdict(int)
        self.by_user: dict[str, int] = defaultdict(int)
        # Per server: when its first and last request arrived (epoch seconds).
        self.span: dict[str, list[float]] = {}
        self.room_reads = 0
        self.whoami = 0
        # Every request to "our homeserver" other than profiles, by kind: whoami,
        # admin_rooms (list pages), admin_state (room state reads), admin_refused,
        # client_rooms, other.
        self.homeserver: dict[str, int] = defaultdict(int)
        self.first_request: float | None = None
        self.last_request: float | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "rate_limited": dict(self.rate_limited),
            "max_in_flight": dict(self.max_in_flight),
            "by_user": dict(self.by_user),
            "span": self.span,
            "total_requests": sum(self.requests.values()),
            "total_rate_limited": sum(self.rate_limited.values()),
            "room_reads": self.room_reads,
            "whoami": self.whoami,
            "homeserver_requests": dict(self.homeserver),
            "homeserver_requests_total": sum(self.homeserver.values()),
            "first_request": self.first_request,
            "last_request": self.last_request,
            "now": time.time(),
        }


STATE = State()
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many",
}


def _response(status: int, body: object, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    payload = _encode(body)
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    head += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


async def _profile(path: str) -> bytes:
    user_id = urllib.parse.unquote(path[len(PROFILE_PREFIX) :])
    server = user_id.partition(":")[2]
    now = time.time()
    STATE.first_request = STATE.first_request or now
    STATE.last_request = now
    span = STATE.span.setdefault(server, [now, now])
    span[1] = now
    STATE.requests[server] += 1
    STATE.by_user[user_id] += 1
    STATE.in_flight[server] += 1
    try:
        in_flight = STATE.in_flight[server]
        STATE.max_in_flight[server] = max(STATE.max_in_flight[server], in_flight)
        if in_flight > STATE.max_concurrent:
            # Counted and refused at once, as a rate-limiting remote would.
            STATE.rate_limited[server] += 1
            return _response(
                429,
                {"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests"},
                (("Retry-After", "1"),),
            )
        if STATE.latency > 0:
            await asyncio.sleep(STATE.latency)
        return _response(200, public_profile(user_id, STATE.versions.get(user_id, 0)))
    finally:
        STATE.in_flight[server] -= 1


def _token(headers: dict[str, str], query: dict[str, list[str]]) -> str:
    header = headers.get("authorization", "")
    if header:
        return header.removeprefix("Bearer ").strip()
    return (query.get("access_token") or [""])[0]


def _whoami(headers: dict[str, str], query: dict[str, list[str]]) -> bytes:
    STATE.whoami += 1
    STATE.homeserver["whoami"] += 1
    token = _token(headers, query)
    if token.startswith("bench:@"):
        return _response(200, {"user_id": token.removeprefix("bench:")})
    if AS_TOKEN and token == AS_TOKEN:
        return _response(200, {"user_id": AS_USER})
    if ADMIN_TOKEN and token == ADMIN_TOKEN:
        return _response(200, {"user_id": ADMIN_USER})
    return _response(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})


def _admin(path: str, headers: dict[str, str], query: dict[str, list[str]]) -> bytes:
    """Synapse's admin room list and room state, for the generated homeserver."""
    token = _token(headers, query)
    if not (ADMIN_TOKEN and token == ADMIN_TOKEN):
        STATE.homeserver["admin_refused"] += 1
        if token and token == AS_TOKEN:
            return _response(403, {"errcode": "M_FORBIDDEN", "error": "You are not a server admin"})
        return _response(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})
    rooms = STATE.rooms
    if path == ADMIN_ROOMS:
        STATE.homeserver["admin_rooms"] += 1
        total = rooms.spec.rooms if rooms else 0
        try:
            start = int((query.get("from") or ["0"])[0])
            limit = int((query.get("limit") or [str(DEFAULT_ROOMS_LIMIT)])[0])
        except ValueError:
            return _response(400, {"errcode": "M_INVALID_PARAM", "error": "Bad paging"})
        if start < 0 or limit < 0:
            return _response(400, {"errcode": "M_INVALID_PARAM", "error": "Bad paging"})
        end = min(total, start + limit)
        page: dict[str, Any] = {
            "rooms": [rooms.list_entry(i) for i in range(start, end)] if rooms else [],
            "offset": start,
            "total_rooms": total,
        }
        if end < total:
            page["next_batch"] = end
        if start > 0:
            page["prev_batch"] = max(0, start - limit)
        return _response(200, page)
    room_id, _, rest = path[len(ADMIN_ROOMS) + 1 :].partition("/")
    index = rooms.index_of(urllib.parse.unquote(room_id)) if rooms else None
    if rest == "state" and path.startswith(ADMIN_ROOMS + "/"):
        STATE.homeserver["admin_state"] += 1
        if index is None:
            return _response(404, {"errcode": "M_NOT_FOUND", "error": "Room not found"})
        return _response(200, {"state": rooms.state_events(index)})
    STATE.homeserver["other"] += 1
    return _response(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized"})


def _control(method: str, path: str, body: bytes) -> bytes:
    if path == "/_bench/stats":
        return _response(200, STATE.stats())
    data = json.loads(body or b"{}")
    if method == "POST" and path == "/_bench/reset":
        STATE.reset()
    elif method == "POST" and path == "/_bench/config":
        STATE.latency = float(data.get("latency_ms", STATE.latency * 1000)) / 1000
        STATE.max_concurrent = int(data.get("max_concurrent", STATE.max_concurrent))
    elif method == "POST" and path == "/_bench/profiles":
        STATE.versions.update({str(k): int(v) for k, v in data.items()})
    elif method == "POST" and path == "/_bench/rooms":
        STATE.rooms = GeneratedRooms(RoomSpec.from_json(data)) if data.get("rooms") else None
    else:
        return _response(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized"})
    return _response(200, {})


async def _route(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
    path, _, raw_query = target.partition("?")
    if path.startswith(PROFILE_PREFIX) and method == "GET":
        return await _profile(path)
    if path.startswith("/_bench/"):
        return _control(method, path, body)
    query = urllib.parse.parse_qs(raw_query)
    if path == WHOAMI_PATH:
        return _whoami(headers, query)
    if path.startswith(ADMIN_PREFIX) and method == "GET":
        return _admin(path, headers, query)
    if path.startswith(ROOMS_PREFIX):
        STATE.room_reads += 1
        STATE.homeserver["client_rooms"] += 1
        return _response(403, {"errcode": "M_FORBIDDEN", "error": "Not in room"})
    STATE.homeserver["other"] += 1
    return _response(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized"})


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_SECONDS)
            except TimeoutError:
                return
            if not line:
                return
            method, target, _version = line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while True:
                header = await reader.readline()
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length > MAX_BODY_BYTES:
                return
            body = await reader.readexactly(length) if length else b""
            writer.write(await _route(method, target, headers, body))
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(_serve, host, port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake homeserver listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
