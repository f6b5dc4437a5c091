"""HTTP server entry point: `python server.py`.

Serves the appservice API (transactions from the homeserver), the Matrix
user-directory search, /health and /metrics on HTTP_HOST:HTTP_PORT.
"""

from __future__ import annotations

import redis.asyncio as aioredis
import uvicorn

from directory.api.app import create_app
from directory.config import get_settings
from directory.logs import configure_logging
from tasks.outbox import wake_inbox_consumer
from tasks.resources import get_resources


def main() -> None:
    configure_logging(get_settings(), "server")
    resources = get_resources()
    settings = resources.settings
    app = create_app(
        settings,
        resources.engine,
        aioredis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5),
        wake_inbox_consumer,
    )
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level="info",
        # configure_logging set up uvicorn's loggers (access log redacted).
        log_config=None,
        # Searches go through the operator's reverse proxy; trust its X-Forwarded-For.
        proxy_headers=True,
    )


if __name__ == "__main__":
    main()
