"""HTTP server entry point: `python server.py`.

Serves the appservice API (transactions from the homeserver), the Matrix
user-directory search, /health and /metrics on HTTP_HOST:HTTP_PORT.
"""

from __future__ import annotations

import redis.asyncio as aioredis
import uvicorn

from directory.api.app import create_app
from directory.config import get_settings
from directory.db import make_engine
from directory.logs import configure_logging
from tasks.outbox import wake_inbox_consumer
from tasks.resources import get_resources

# A search waiting longer than this for a connection of its pool is answered 503.
SEARCH_POOL_TIMEOUT_SECONDS = 5.0


def main() -> None:
    configure_logging(get_settings(), "server")
    resources = get_resources()
    settings = resources.settings
    # Searches get a pool of their own: however many are slow, transactions (accepted
    # on resources.engine) still find a connection.
    search_engine = make_engine(
        settings.database_url,
        pool_size=settings.search_pool_size,
        max_overflow=0,
        pool_timeout=SEARCH_POOL_TIMEOUT_SECONDS,
    )
    app = create_app(
        settings,
        resources.engine,
        aioredis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5),
        wake_inbox_consumer,
        search_engine=search_engine,
    )
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level="info",
        # configure_logging set up uvicorn's loggers (access log redacted).
        log_config=None,
        # Searches go through the operator's reverse proxy: the client address (the
        # unverified-token rate limit's key) is its X-Forwarded-For when the peer is
        # one of FORWARDED_ALLOW_IPS (default: this machine), else the peer's address.
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


if __name__ == "__main__":
    main()
