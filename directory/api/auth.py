"""Who is searching? Ask the homeserver (`/account/whoami`) with the caller's token.

Successes are cached for TOKEN_CACHE_SECONDS so a typing user does not cost one
homeserver round trip per keystroke; rejections only for a moment, since a token
unknown now may be valid a second later.
"""

from __future__ import annotations

import hashlib
import time

import httpx

from directory.api.errors import MatrixError
from directory.config import Settings

# Bounds the cache's memory; past it the cache starts afresh.
MAX_CACHED_TOKENS = 100_000


class TokenVerifier:
    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self.client = httpx.AsyncClient(
            base_url=settings.homeserver_url,
            timeout=httpx.Timeout(10.0, connect=settings.fetch_connect_timeout_seconds),
            follow_redirects=False,
            transport=transport,
        )
        self._cache: dict[bytes, tuple[str | None, float]] = {}

    async def close(self) -> None:
        await self.client.aclose()

    async def user_for(self, token: str | None) -> str:
        if not token:
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token")
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            if cached[0] is None:
                raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unrecognised access token")
            return cached[0]
        user_id = await self._ask_homeserver(token)
        if len(self._cache) >= MAX_CACHED_TOKENS:
            self._cache.clear()
        ttl = (
            self.settings.token_cache_seconds
            if user_id
            else self.settings.token_failure_cache_seconds
        )
        self._cache[key] = (user_id, now + ttl)
        if user_id is None:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unrecognised access token")
        return user_id

    async def _ask_homeserver(self, token: str) -> str | None:
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
            user_id = response.json().get("user_id")
        except (ValueError, AttributeError) as exc:
            raise MatrixError(502, "M_UNKNOWN", "homeserver sent a bad whoami answer") from exc
        if not isinstance(user_id, str):
            raise MatrixError(502, "M_UNKNOWN", "homeserver sent a bad whoami answer")
        return user_id
