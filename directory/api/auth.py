"""Who is searching? Ask the homeserver (`/account/whoami`) with the caller's token.

Answers are cached, successes for TOKEN_CACHE_SECONDS so a typing user does not cost
one homeserver round trip per keystroke, rejections only for TOKEN_FAILURE_CACHE_SECONDS
since a token unknown now may be valid a second later.

A logged-out token stops working within TOKEN_CACHE_SECONDS of the logout, whatever
order the homeserver's answers arrive in:
- an entry's lifetime counts from when its whoami request *started*, not from when
  the answer arrived: an answer "valid" to a request sent before the logout is
  trusted until at most logout + TOKEN_CACHE_SECONDS;
- an answer never replaces an entry written from a request that started later: a
  slow "valid" cannot undo a newer rejection.

Before asking the homeserver, a request is charged to its client address's bucket
(SEARCH_UNVERIFIED_RATE_*): random tokens sprayed from one address cost at most that
many whoami calls, and a request with no token, a malformed one or a rejected one
(cached or not) is charged too. A token the homeserver accepts gives its charge
back, so users sharing an address (a NAT) do not use up each other's bucket.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import time
from dataclasses import dataclass

import httpx

from directory.api.errors import MatrixError, limit_exceeded
from directory.api.ratelimit import RateLimiter
from directory.config import Settings

# Bounds the cache's memory; past it expired entries go, then (if still full) all.
MAX_CACHED_TOKENS = 100_000
# Access tokens are printable ASCII (RFC 6750's b64token is a subset); one longer than
# this is not a token any homeserver issues (Synapse's are ~40 characters, a JWT a few
# hundred). Anything else is rejected here: it could not even be sent in a header.
MAX_TOKEN_LENGTH = 4096
_TOKEN = re.compile(r"[\x21-\x7e]+")
WHOAMI_TIMEOUT_SECONDS = 10.0
# An expired entry is kept this long after its request started, so that a slow
# answer to an older request still finds it and does not overwrite it.
_MARKER_SECONDS = WHOAMI_TIMEOUT_SECONDS * 2


@dataclass(frozen=True)
class Requester:
    user_id: str
    is_guest: bool


@dataclass(frozen=True, slots=True)
class _Entry:
    requester: Requester | None  # None: the homeserver rejected the token
    started: float  # time.monotonic() when the whoami request that wrote it started
    expires: float


def unknown_token() -> MatrixError:
    return MatrixError(401, "M_UNKNOWN_TOKEN", "Unrecognised access token")


def address_key(host: str | None) -> str:
    """The rate-limit key of a client address: the IPv4 address, an IPv6 address's
    /64 (one subscriber's usual allocation), or the host string as given."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:100]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class TokenVerifier:
    def __init__(
        self,
        settings: Settings,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.client = httpx.AsyncClient(
            base_url=settings.homeserver_url,
            timeout=httpx.Timeout(
                WHOAMI_TIMEOUT_SECONDS, connect=settings.fetch_connect_timeout_seconds
            ),
            follow_redirects=False,
            transport=transport,
        )
        # None: no address limit (the app always passes one).
        self.limiter = limiter
        self._cache: dict[bytes, _Entry] = {}

    async def close(self) -> None:
        await self.client.aclose()

    async def requester_for(self, token: str | None, address: str = "unknown") -> Requester:
        """The token's owner; 401 for no token or one the homeserver rejects, 429 when
        the address has sent too many such requests, 502 if the homeserver fails."""
        if not token:
            await self._charge(address)
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token")
        if len(token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            await self._charge(address)
            raise unknown_token()
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        if cached is not None and cached.expires > time.monotonic():
            if cached.requester is None:
                await self._charge(address)
                raise unknown_token()
            return cached.requester
        await self._charge(address)
        started = time.monotonic()
        requester = await self._ask_homeserver(token)
        self._remember(key, requester, started)
        if requester is None:
            raise unknown_token()
        if self.limiter is not None:
            await self.limiter.give_back(f"unverified:{address}")
        return requester

    async def _charge(self, address: str) -> None:
        if self.limiter is None:
            return
        wait = await self.limiter.take(f"unverified:{address}")
        if wait is not None:
            raise limit_exceeded(wait)

    def _remember(self, key: bytes, requester: Requester | None, started: float) -> None:
        existing = self._cache.get(key)
        if existing is not None and existing.started > started:
            return  # a request that started later has answered already: it wins
        if existing is None and len(self._cache) >= MAX_CACHED_TOKENS:
            self._make_room()
        ttl = (
            self.settings.token_cache_seconds
            if requester is not None
            else self.settings.token_failure_cache_seconds
        )
        self._cache[key] = _Entry(requester, started, started + ttl)

    def _make_room(self) -> None:
        now = time.monotonic()
        self._cache = {
            key: entry
            for key, entry in self._cache.items()
            if entry.expires > now or entry.started > now - _MARKER_SECONDS
        }
        if len(self._cache) >= MAX_CACHED_TOKENS:
            # Entries' lifetimes still count from their requests' start, so a logged-out
            # token stops working within TOKEN_CACHE_SECONDS even so.
            self._cache.clear()

    async def _ask_homeserver(self, token: str) -> Requester | None:
        try:
            response = await self.client.get(
                "/_matrix/client/v3/account/whoami",
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.HTTPError as exc:
            raise MatrixError(
                502, "M_UNKNOWN", "could not reach the homeserver to verify the token"
            ) from exc
        if response.status_code in (401, 403):
            return None
        if response.status_code != 200:
            raise MatrixError(
                502, "M_UNKNOWN", f"homeserver answered {response.status_code} to whoami"
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise MatrixError(502, "M_UNKNOWN", "homeserver sent a bad whoami answer") from exc
        user_id = body.get("user_id") if isinstance(body, dict) else None
        if not isinstance(user_id, str):
            raise MatrixError(502, "M_UNKNOWN", "homeserver sent a bad whoami answer")
        # Synapse always says; a homeserver that does not say has no guests to speak of.
        return Requester(user_id, is_guest=body.get("is_guest") is True)
