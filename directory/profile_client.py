"""Strict, bounded fetching of one user's public profile through our own homeserver.

Our homeserver answers `GET /_matrix/client/v3/profile/{userId}` for remote users by
asking their server over federation, so whatever a stranger's server sends reaches us
(mostly) verbatim. Everything here is therefore bounded: connect/read timeouts, a
wall-clock deadline per attempt, a byte cap enforced while streaming, and a strict
reading of the JSON. A result is only OK when the answer is exactly what the spec
allows; anything hostile is INVALID, and callers must then change nothing.

The client never raises for network or protocol problems: every way a request can end
is one `Outcome`, so callers decide policy (backoff, give up) in one place.

It speaks HTTP/1.1 through the standard library's `http.client`, one keep-alive
connection per thread: a worker makes hundreds of these requests a second, and a
general-purpose client (httpx) cost three times the CPU per request, which made one
worker process CPU-bound long before the remote servers' politeness limit was reached.
"""

from __future__ import annotations

import dataclasses
import enum
import http.client
import json
import logging
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from types import TracebackType

from tenacity import Retrying, retry_if_result, stop_after_attempt, wait_exponential

from directory.config import Settings
from directory.events import ProfileValue
from directory.listing import account_state, profile_visibility
from directory.matrix_http import matrix_errcode, retry_after_seconds
from directory.text import (
    MAX_AVATAR_URL_LENGTH,
    MAX_DISPLAYNAME_LENGTH,
    clean_avatar_url,
    clean_displayname,
)

logger = logging.getLogger(__name__)

PROFILE_PATH = "/_matrix/client/v3/profile/"
ADMIN_USER_PATH = "/_synapse/admin/v2/users/"
# Quick retries live inside one task, so their waits stay short whatever the setting.
QUICK_RETRY_MAX_WAIT_SECONDS = 4.0
MAX_ERROR_LENGTH = 200
READ_CHUNK_BYTES = 64 * 1024


class Outcome(enum.Enum):
    OK = "ok"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"
    INVALID = "invalid"
    # Our own homeserver did not serve the request at all: it is down, refused our
    # AS_TOKEN, or HOMESERVER_URL points at something else. Nothing is known about the
    # user or their server, so neither may be charged for it.
    HOMESERVER = "homeserver"


@dataclass(frozen=True)
class FetchResult:
    outcome: Outcome
    profile: ProfileValue | None = None
    error: str | None = None
    retry_after_seconds: float | None = None
    # The HTTP status of the answer judged (None: no answer, e.g. a timeout).
    status: int | None = None
    # The profile's MSC4258 m.user_directory.visibility, if a known value (OK only).
    visibility: str | None = None
    # For a local user with ADMIN_TOKEN set, what Synapse's admin API said of the
    # account (directory/fetching.py asks); None: not asked.
    account: AccountLookup | None = None


@dataclass(frozen=True)
class AccountLookup:
    """GET /_synapse/admin/v2/users/<user_id>: `state` is "deactivated", "support",
    "locked" or None (a normal account) when `known`; otherwise `error` says why not."""

    known: bool
    state: str | None = None
    error: str | None = None


def _result(
    outcome: Outcome,
    error: str | None = None,
    *,
    profile: ProfileValue | None = None,
    retry_after_seconds: float | None = None,
    visibility: str | None = None,
) -> FetchResult:
    if error is not None and len(error) > MAX_ERROR_LENGTH:
        error = error[: MAX_ERROR_LENGTH - 3] + "..."
    return FetchResult(
        outcome=outcome,
        profile=profile,
        error=error,
        retry_after_seconds=retry_after_seconds,
        visibility=visibility,
    )


class _BodyTooLarge(Exception):
    pass


class _CannotConnect(Exception):
    pass


class _DeadlineExceeded(Exception):
    pass


def parse_profile(body: bytes) -> FetchResult:
    """Judge a 200 body: OK with a cleaned profile, or INVALID with the reason."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        return _result(Outcome.INVALID, "body is not valid UTF-8")
    except (ValueError, RecursionError):
        # RecursionError: "[[[[..." nested deeper than the parser's stack fits in 64 KB.
        return _result(Outcome.INVALID, "body is not valid JSON")
    if not isinstance(data, dict):
        return _result(Outcome.INVALID, f"body is a JSON {type(data).__name__}, not an object")

    displayname = data.get("displayname")
    avatar_url = data.get("avatar_url")
    # Wrong types are not "no name": the answer is broken, so it must change nothing.
    # Truncating or repairing either field would show something the user never set
    # (or point at other media): a hostile value rejects the whole answer.
    for field, value, cap in (
        ("displayname", displayname, MAX_DISPLAYNAME_LENGTH),
        ("avatar_url", avatar_url, MAX_AVATAR_URL_LENGTH),
    ):
        if value is None:
            continue
        if not isinstance(value, str):
            return _result(Outcome.INVALID, f"{field} is a {type(value).__name__}")
        if "\x00" in value:
            return _result(Outcome.INVALID, f"{field} contains a NUL character")
        if len(value) > cap:
            return _result(Outcome.INVALID, f"{field} is {len(value)} characters, over {cap}")
    profile = ProfileValue(
        displayname=clean_displayname(displayname), avatar_url=clean_avatar_url(avatar_url)
    )
    # An extended profile field (MSC4133) in the same answer; an unknown value or type
    # is no preference (directory/listing.py).
    return _result(Outcome.OK, profile=profile, visibility=profile_visibility(data))


class ProfileClient:
    """Fetches profiles; safe to share between worker threads."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        base = urllib.parse.urlsplit(settings.homeserver_url)
        # A malformed URL fails every attempt (TRANSIENT, with the reason) instead of
        # the process that merely holds a client.
        self._url_error = (
            None
            if base.scheme in ("http", "https") and base.hostname
            else f"HOMESERVER_URL is not an http(s) URL: {settings.homeserver_url!r}"
        )
        self._https = base.scheme == "https"
        self._host = base.hostname or ""
        self._port = base.port
        self._base_url = settings.homeserver_url.rstrip("/")
        self._base_path = base.path.rstrip("/")
        self._max_bytes = settings.profile_max_bytes
        self._connect_timeout = settings.fetch_connect_timeout_seconds
        self._read_timeout = settings.fetch_read_timeout_seconds
        # The per-read timeout alone lets a trickling server hold us forever; the
        # deadline bounds one attempt as a whole.
        self._attempt_seconds = (
            settings.fetch_connect_timeout_seconds + settings.fetch_read_timeout_seconds
        )
        headers = {
            # Compressed bodies could expand far past the byte cap before we see them.
            "Accept-Encoding": "identity",
            "Accept": "application/json",
        }
        if settings.as_token:
            headers["Authorization"] = f"Bearer {settings.as_token}"
        self._headers = headers
        self._ssl = ssl.create_default_context() if self._https else None
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._connections_lock = threading.Lock()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, connected; and whether it was open already."""
        if self._url_error:
            raise ValueError(self._url_error)
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._ssl is not None:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._connect_timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._connect_timeout
                )
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        if conn.sock is not None:
            return conn, True
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout)
        return conn, False

    def __enter__(self) -> ProfileClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    def fetch(self, user_id: str) -> FetchResult:
        """The user's public profile, retrying a transient failure a few times quickly."""
        settings = self._settings
        retrying = Retrying(
            stop=stop_after_attempt(1 + max(0, settings.fetch_quick_retries)),
            wait=wait_exponential(
                multiplier=settings.fetch_quick_retry_wait_seconds,
                max=QUICK_RETRY_MAX_WAIT_SECONDS,
            ),
            retry=retry_if_result(lambda r: r.outcome is Outcome.TRANSIENT),
            # Out of attempts: the last TRANSIENT result is the answer, not an exception.
            retry_error_callback=lambda state: state.outcome.result(),  # type: ignore[union-attr]
        )
        # Logged once per fetch, with its claim's generation, by directory/fetching.py.
        return retrying(self._attempt, user_id)

    def _connect(self) -> tuple[http.client.HTTPConnection, bool]:
        try:
            return self._connection()
        except (OSError, ValueError) as exc:
            # Refused, unreachable, a connect timeout or a bad URL: all about the
            # connection to our own homeserver, none about the user's server.
            self._discard(getattr(self._local, "conn", None))
            raise _CannotConnect(f"cannot connect to HOMESERVER_URL: {exc}") from exc

    def _attempt(self, user_id: str) -> FetchResult:
        path = self._base_path + PROFILE_PATH + urllib.parse.quote(user_id, safe="")
        deadline = time.monotonic() + self._attempt_seconds
        conn: http.client.HTTPConnection | None = None
        try:
            conn, reused = self._connect()
            try:
                response = self._send(conn, path)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                # The server closed the idle keep-alive connection: a new one, once.
                conn.close()
                conn, _ = self._connect()
                response = self._send(conn, path)
            result = dataclasses.replace(self._judge(response, deadline), status=response.status)
            if not response.isclosed() or response.will_close:
                # Unread body, or the server closes: this connection is done.
                conn.close()
            return result
        except _CannotConnect as exc:
            return _result(Outcome.HOMESERVER, str(exc))
        except TimeoutError as exc:
            self._discard(conn)
            return _result(Outcome.TRANSIENT, f"timeout: {type(exc).__name__}")
        except (http.client.HTTPException, OSError, ValueError) as exc:
            # ValueError: http.client refusing something malformed in the answer.
            self._discard(conn)
            return _result(Outcome.TRANSIENT, f"{type(exc).__name__}: {exc}")

    def _send(
        self,
        conn: http.client.HTTPConnection,
        path: str,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        conn.request("GET", path, headers=headers or self._headers)
        return conn.getresponse()

    def account(self, user_id: str) -> AccountLookup:
        """What Synapse's admin API says of a local user's account, with ADMIN_TOKEN:
        one attempt, on the same connection as profiles; a failure is not known."""
        if not self._settings.admin_token:
            return AccountLookup(False, error="ADMIN_TOKEN is not set")
        path = self._base_path + ADMIN_USER_PATH + urllib.parse.quote(user_id, safe="")
        headers = {**self._headers, "Authorization": f"Bearer {self._settings.admin_token}"}
        deadline = time.monotonic() + self._attempt_seconds
        conn: http.client.HTTPConnection | None = None
        try:
            conn, reused = self._connect()
            try:
                response = self._send(conn, path, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                conn.close()
                conn, _ = self._connect()
                response = self._send(conn, path, headers)
            try:
                body = self._read_capped(response, deadline)
            except (_BodyTooLarge, _DeadlineExceeded):
                conn.close()
                return AccountLookup(False, error="the admin API's answer is too large or slow")
            if not response.isclosed() or response.will_close:
                conn.close()
        except _CannotConnect as exc:
            return AccountLookup(False, error=str(exc))
        except (http.client.HTTPException, OSError, ValueError) as exc:
            self._discard(conn)
            return AccountLookup(False, error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH])
        if response.status != 200:
            errcode = matrix_errcode(body)
            detail = f"HTTP {response.status}" + (f" {errcode}" if errcode else "")
            return AccountLookup(False, error=f"admin API: {detail}")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return AccountLookup(False, error="admin API: the answer is not JSON")
        if not isinstance(data, dict):
            return AccountLookup(False, error="admin API: the answer is not an object")
        return AccountLookup(True, account_state(data))

    @staticmethod
    def _discard(conn: http.client.HTTPConnection | None) -> None:
        if conn is not None:
            conn.close()

    def _judge(self, response: http.client.HTTPResponse, deadline: float) -> FetchResult:
        status = response.status
        if status == 200:
            encoding = (response.getheader("content-encoding") or "identity").strip().lower()
            if encoding not in ("", "identity"):
                return _result(Outcome.INVALID, f"unrequested content encoding {encoding!r}")
            try:
                body = self._read_capped(response, deadline)
            except _BodyTooLarge:
                return _result(Outcome.INVALID, f"body larger than {self._max_bytes} bytes")
            except _DeadlineExceeded:
                return _result(
                    Outcome.TRANSIENT, f"body not complete within {self._attempt_seconds:g} s"
                )
            return parse_profile(body)

        # Error bodies are only read for their errcode/retry hint, and only if small;
        # reading them lets the connection be used again.
        try:
            body = self._read_capped(response, deadline)
        except (_BodyTooLarge, _DeadlineExceeded):
            body = b""
        errcode = matrix_errcode(body)
        detail = f"HTTP {status}" + (f" {errcode}" if errcode else "")
        if status == 404:
            if errcode == "M_UNRECOGNIZED":
                # The endpoint itself is unknown: HOMESERVER_URL points at the wrong
                # thing, which says nothing about the user. (Said in the fetch's log
                # line and the run's warning, in tasks/fetch.py.)
                return _result(
                    Outcome.HOMESERVER,
                    f"{detail}: no profile endpoint there, check HOMESERVER_URL",
                )
            return _result(Outcome.NOT_FOUND, detail)
        if status == 403:
            return _result(Outcome.FORBIDDEN, detail)
        if status == 429:
            return _result(
                Outcome.RATE_LIMITED,
                detail,
                retry_after_seconds=retry_after_seconds(response.getheader("retry-after"), body),
            )
        if status == 401:
            return _result(Outcome.HOMESERVER, f"{detail}: our homeserver refuses AS_TOKEN")
        if status >= 500 and errcode is None:
            # Synapse words every error it sends, a remote's failure included; a bare
            # 5xx comes from a proxy in front of a homeserver that is not answering.
            return _result(Outcome.HOMESERVER, f"{detail} without a Matrix error body")
        return _result(Outcome.TRANSIENT, detail)

    def _read_capped(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        declared = response.getheader("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self._max_bytes:
            raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        # Raw bytes: we asked for identity, and decoding could expand past the cap.
        while chunk := response.read1(READ_CHUNK_BYTES):
            size += len(chunk)
            if size > self._max_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise _DeadlineExceeded
        # Nothing is left to read; this marks the response complete (read1 does not), so
        # the connection is kept for the next request.
        response.read()
        return b"".join(chunks)
