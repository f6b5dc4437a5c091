"""Strict, bounded fetching of one user's public profile through our own homeserver.

Our homeserver answers `GET /_matrix/client/v3/profile/{userId}` for remote users by
asking their server over federation, so whatever a stranger's server sends reaches us
(mostly) verbatim. Everything here is therefore bounded: connect/read timeouts, a
wall-clock deadline per attempt, a byte cap enforced while streaming, and a strict
reading of the JSON. A result is only OK when the answer is exactly what the spec
allows; anything hostile is INVALID, and callers must then change nothing.

The client never raises for network or protocol problems: every way a request can end
is one `Outcome`, so callers decide policy (backoff, give up) in one place.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import threading
import time
import urllib.parse
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType

import httpx
from tenacity import Retrying, retry_if_result, stop_after_attempt, wait_exponential

from directory.config import Settings
from directory.events import ProfileValue
from directory.text import (
    MAX_AVATAR_URL_LENGTH,
    MAX_DISPLAYNAME_LENGTH,
    clean_avatar_url,
    clean_displayname,
    split_user_id,
)

logger = logging.getLogger(__name__)
# httpx logs every request at INFO. A worker fetching hundreds of profiles a second
# then spends its time queueing for the log handler's lock; _log below reports what
# matters about each answer.
logging.getLogger("httpx").setLevel(logging.WARNING)

PROFILE_PATH = "/_matrix/client/v3/profile/"
# Quick retries live inside one task, so their waits stay short whatever the setting.
QUICK_RETRY_MAX_WAIT_SECONDS = 4.0
# 429 without a usable hint: long enough to matter, short enough not to stall a server.
DEFAULT_RETRY_AFTER_SECONDS = 5.0
# A remote may not park one of our destinations for longer than this with one header.
MAX_RETRY_AFTER_SECONDS = 3600.0
MAX_ERROR_LENGTH = 200


class Outcome(enum.Enum):
    OK = "ok"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TRANSIENT = "transient"
    INVALID = "invalid"


@dataclass(frozen=True)
class FetchResult:
    outcome: Outcome
    profile: ProfileValue | None = None
    error: str | None = None
    retry_after_seconds: float | None = None


def _result(
    outcome: Outcome,
    error: str | None = None,
    *,
    profile: ProfileValue | None = None,
    retry_after_seconds: float | None = None,
) -> FetchResult:
    if error is not None and len(error) > MAX_ERROR_LENGTH:
        error = error[: MAX_ERROR_LENGTH - 3] + "..."
    return FetchResult(
        outcome=outcome, profile=profile, error=error, retry_after_seconds=retry_after_seconds
    )


class _BodyTooLarge(Exception):
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
    return _result(Outcome.OK, profile=profile)


def _errcode(body: bytes) -> str | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if isinstance(data, dict) and isinstance(data.get("errcode"), str):
        return data["errcode"][:64]
    return None


def _retry_after(response: httpx.Response, body: bytes) -> float:
    """Seconds to wait after a 429: Retry-After (seconds or HTTP date), else retry_after_ms."""
    seconds: float | None = None
    header = response.headers.get("retry-after")
    if header is not None:
        header = header.strip()
        try:
            seconds = float(header)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(header).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                seconds = None
    if seconds is None:
        try:
            data = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict):
            ms = data.get("retry_after_ms")
            if isinstance(ms, int | float) and not isinstance(ms, bool):
                seconds = ms / 1000.0
    if seconds is None or not math.isfinite(seconds):
        return DEFAULT_RETRY_AFTER_SECONDS
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


class ProfileClient:
    """Fetches profiles; safe to share between worker threads."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        self._settings = settings
        self._base_url = settings.homeserver_url.rstrip("/")
        self._max_bytes = settings.profile_max_bytes
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
        self._timeout = httpx.Timeout(
            connect=settings.fetch_connect_timeout_seconds,
            read=settings.fetch_read_timeout_seconds,
            write=settings.fetch_connect_timeout_seconds,
            pool=settings.fetch_connect_timeout_seconds,
        )
        self._transport = transport
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()

    def _http(self) -> httpx.Client:
        """This thread's HTTP client. One per thread, not one shared pool: a shared pool
        serialises every request's start and end on its lock (httpcore checks each
        pooled connection under it), and with dozens of threads waiting for the GIL
        that lock became the worker's bottleneck. A thread has one request in flight,
        so its client keeps one connection alive."""
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                headers=self._headers,
                timeout=self._timeout,
                follow_redirects=False,
                transport=self._transport,
            )
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

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
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
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
        result: FetchResult = retrying(self._attempt, user_id)
        self._log(user_id, result)
        return result

    def _log(self, user_id: str, result: FetchResult) -> None:
        server = split_user_id(user_id)[1]
        if result.outcome is Outcome.OK:
            logger.debug("fetched profile of %s", user_id)
        elif result.outcome in (Outcome.NOT_FOUND, Outcome.FORBIDDEN):
            logger.info("profile of %s: %s (%s)", user_id, result.outcome.value, result.error)
        else:
            logger.warning(
                "profile of %s (server %s): %s (%s)",
                user_id,
                server,
                result.outcome.value,
                result.error,
            )

    def _attempt(self, user_id: str) -> FetchResult:
        url = self._base_url + PROFILE_PATH + urllib.parse.quote(user_id, safe="")
        deadline = time.monotonic() + self._attempt_seconds
        try:
            with self._http().stream("GET", url) as response:
                return self._judge(response, deadline)
        except httpx.TimeoutException as exc:
            return _result(Outcome.TRANSIENT, f"timeout: {type(exc).__name__}")
        except httpx.ConnectError as exc:
            return _result(Outcome.TRANSIENT, f"cannot connect: {exc}")
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError) as exc:
            return _result(Outcome.TRANSIENT, f"{type(exc).__name__}: {exc}")

    def _judge(self, response: httpx.Response, deadline: float) -> FetchResult:
        status = response.status_code
        if status == 200:
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
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
        # reading them lets the connection go back to the pool.
        try:
            body = self._read_capped(response, deadline)
        except (_BodyTooLarge, _DeadlineExceeded):
            body = b""
        errcode = _errcode(body)
        detail = f"HTTP {status}" + (f" {errcode}" if errcode else "")
        if status == 404:
            if errcode == "M_UNRECOGNIZED":
                # The endpoint itself is unknown: HOMESERVER_URL points at the wrong
                # thing, which says nothing about the user.
                logger.warning(
                    "%s does not recognise the profile endpoint; check HOMESERVER_URL",
                    self._base_url,
                )
                return _result(Outcome.TRANSIENT, detail)
            return _result(Outcome.NOT_FOUND, detail)
        if status == 403:
            return _result(Outcome.FORBIDDEN, detail)
        if status == 429:
            return _result(
                Outcome.RATE_LIMITED, detail, retry_after_seconds=_retry_after(response, body)
            )
        if status == 401:
            logger.warning("homeserver rejected our AS token (%s); check AS_TOKEN", detail)
        return _result(Outcome.TRANSIENT, detail)

    def _read_capped(self, response: httpx.Response, deadline: float) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self._max_bytes:
            raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        # Raw bytes: we asked for identity, and decoding could expand past the cap.
        for chunk in response.iter_raw():
            size += len(chunk)
            if size > self._max_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise _DeadlineExceeded
        return b"".join(chunks)
