"""Per-process clients (database engine, Redis, HTTP), created on first use.

Created lazily and keyed by process id, so a prefork child never reuses its parent's
sockets; shared by the threads of one process (all three are thread-safe).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis
from sqlalchemy import Engine

from directory.config import Settings, get_settings
from directory.db import make_engine
from directory.homeserver import HomeserverClient
from directory.profile_client import ProfileClient


@dataclass
class Resources:
    settings: Settings
    engine: Engine
    redis: redis.Redis
    profiles: ProfileClient
    homeserver: HomeserverClient


_lock = threading.Lock()
_resources: tuple[int, Resources] | None = None


def get_resources() -> Resources:
    global _resources
    with _lock:
        if _resources is None or _resources[0] != os.getpid():
            settings = get_settings()
            _resources = (
                os.getpid(),
                Resources(
                    settings=settings,
                    engine=make_engine(settings.database_url),
                    redis=redis.Redis.from_url(
                        settings.redis_url, socket_timeout=10, socket_connect_timeout=5
                    ),
                    profiles=ProfileClient(settings),
                    homeserver=HomeserverClient(settings),
                ),
            )
        return _resources[1]
