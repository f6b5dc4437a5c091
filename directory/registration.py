"""The appservice registration file that tells a homeserver to send us events.

Users namespace `@.*` and rooms `.*`, both non-exclusive: we want every event of every
room with a local member, and we own no users or rooms. Not rate limited: we only read.
"""

from __future__ import annotations

import json
import secrets
import urllib.parse
from dataclasses import dataclass

from directory.config import Settings


@dataclass(frozen=True)
class Registration:
    url: str
    as_token: str
    hs_token: str
    id: str = "userdirectory"
    sender_localpart: str = "userdirectory"

    @classmethod
    def for_settings(cls, settings: Settings, url: str | None = None) -> Registration:
        """Tokens from the settings where set, fresh random ones otherwise."""
        return cls(
            url=url or f"http://{settings.http_host}:{settings.http_port}",
            as_token=settings.as_token or secrets.token_urlsafe(32),
            hs_token=settings.hs_token or secrets.token_urlsafe(32),
            # The same user the listing rules keep out of search (directory/listing.py).
            sender_localpart=settings.sender_localpart,
        )

    def yaml(self) -> str:
        # JSON strings are valid YAML scalars, and quote whatever a token holds.
        q = json.dumps
        return "\n".join(
            [
                f"id: {q(self.id)}",
                f"url: {q(self.url)}",
                f"as_token: {q(self.as_token)}",
                f"hs_token: {q(self.hs_token)}",
                f"sender_localpart: {q(self.sender_localpart)}",
                "rate_limited: false",
                "namespaces:",
                "  users:",
                "    - exclusive: false",
                '      regex: "@.*"',
                "  rooms:",
                "    - exclusive: false",
                '      regex: ".*"',
                "  aliases: []",
                "",
            ]
        )

    def env(self, settings: Settings) -> str:
        port = urllib.parse.urlparse(self.url).port
        lines = [
            f"AS_TOKEN={self.as_token}",
            f"HS_TOKEN={self.hs_token}",
            f"SERVER_NAME={settings.server_name}",
            f"HOMESERVER_URL={settings.homeserver_url}",
        ]
        if self.sender_localpart != "userdirectory":
            lines.append(f"SENDER_LOCALPART={self.sender_localpart}")
        if port is not None:
            lines.append(f"HTTP_PORT={port}")
        return "\n".join(lines) + "\n"
