"""Is our homeserver usable? `/health` asks it, with our AS_TOKEN, who we are."""

from __future__ import annotations

import httpx

from directory.config import Settings
from directory.matrix_http import matrix_errcode

# A health probe must answer quickly even when the homeserver hangs.
PROBE_TIMEOUT_SECONDS = 5.0


class HomeserverProbe:
    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.token = settings.as_token
        self.client = httpx.AsyncClient(
            base_url=settings.homeserver_url,
            timeout=PROBE_TIMEOUT_SECONDS,
            follow_redirects=False,
            transport=transport,
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def status(self) -> str:
        """ "ok", or "error: " and what the operator has to fix."""
        try:
            response = await self.client.get(
                "/_matrix/client/v3/account/whoami",
                headers={"Authorization": f"Bearer {self.token}"},
            )
        except httpx.HTTPError as exc:
            return f"error: cannot reach HOMESERVER_URL ({type(exc).__name__})"
        if response.status_code == 200:
            return "ok"
        errcode = matrix_errcode(response.content)
        detail = f"HTTP {response.status_code}" + (f" {errcode}" if errcode else "")
        if response.status_code in (401, 403):
            return f"error: the homeserver refuses AS_TOKEN ({detail})"
        return f"error: the homeserver answers {detail}"
