"""The benchmark's homeserver: many remote servers behind one HOMESERVER_URL.

Runs as its own process (`python -m bench.fake_homeserver --port N`) on a single
asyncio loop with a minimal HTTP/1.1 parser: 20,000 users x 50 ms with hundreds of
requests in flight would make a thread-per-request server (and the GIL it shares with
the harness) the bottleneck we measure instead of the service.

It answers, as our own homeserver would after asking over federation:
- GET  /_matrix/client/v3/profile/{userId}: after LATENCY, the public profile derived
  from the user id (bench.population.public_profile); 429 M_LIMIT_EXCEEDED at once to
  any request beyond MAX_CONCURRENT in flight for that user's server.
- GET  /_matrix/client/v3/account/whoami: token "bench:@user:server" is that user.
- GET  /_matrix/client/v3/rooms/...: 403, so a room backfill reads nothing and leaves
  what events said (the benchmark's rooms are fully described by their events).
Control (harness only):
- GET  /_bench/stats   requests, 429s and peak concurrency per server, requests per
                       user, room reads
- POST /_bench/reset   zero the counters
- POST /_bench/config  {"latency_ms": float, "max_concurrent": int}
- POST /_bench/profiles {"@u:s": version, ...}: later global renames
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
import urllib.parse
from collections import defaultdict
from typing import Any

from bench.population import public_profile

PROFILE_PREFIX = "/_matrix/client/v3/profile/"
WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
ROOMS_PREFIX = "/_matrix/client/v3/rooms/"
# Requests larger than this are not ours: refuse instead of buffering.
MAX_BODY_BYTES = 64 * 1024 * 1024
# An idle keep-alive connection is closed after this, so a dead client frees its task.
IDLE_SECONDS = 120.0


class State:
    def __init__(self) -> None:
        self.latency = 0.05
        self.max_concurrent = 3
        self.versions: dict[str, int] = {}
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
            "first_request": self.first_request,
            "last_request": self.last_request,
            "now": time.time(),
        }


STATE = State()
REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 429: "Too Many"}


def _response(status: int, body: object, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    payload = json.dumps(body).encode()
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


def _whoami(headers: dict[str, str]) -> bytes:
    STATE.whoami += 1
    token = headers.get("authorization", "").removeprefix("Bearer ").strip()
    if token.startswith("bench:@"):
        return _response(200, {"user_id": token.removeprefix("bench:")})
    return _response(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})


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
    else:
        return _response(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized"})
    return _response(200, {})


async def _route(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
    path = target.split("?", 1)[0]
    if path.startswith(PROFILE_PREFIX) and method == "GET":
        return await _profile(path)
    if path == WHOAMI_PATH:
        return _whoami(headers)
    if path.startswith(ROOMS_PREFIX):
        STATE.room_reads += 1
        return _response(403, {"errcode": "M_FORBIDDEN", "error": "Not in room"})
    if path.startswith("/_bench/"):
        return _control(method, path, body)
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
