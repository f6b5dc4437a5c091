"""Beat's schedule, and a scheduler that only sends while it holds a Redis leader lock.

Two beat processes started by mistake would otherwise send every task twice. The lock
expires on its own, so a killed beat is replaced by a waiting one within LEADER_TTL.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import redis
from celery.beat import PersistentScheduler

from directory.config import get_settings
from directory.locks import Lock
from tasks.app import app

logger = logging.getLogger(__name__)

LEADER_KEY = "ud:beat:leader"
# Long enough to survive a slow tick, short enough that a standby takes over quickly.
LEADER_TTL_MS = 10_000
# A standby checks for a vanished leader this often (seconds).
STANDBY_POLL_SECONDS = 2.0


def build_schedule() -> dict[str, dict]:
    settings = get_settings()

    def entry(task: str, every: float) -> dict:
        # A run queued but not started within one interval is stale: the next replaces it.
        return {"task": task, "schedule": every, "options": {"expires": every}}

    return {
        "reconcile-pending-fetches": entry(
            "tasks.maintenance.reconcile", settings.reconcile_interval_seconds
        ),
        "refresh-old-profiles": entry(
            "tasks.maintenance.refresh_profiles", settings.refresh_interval_seconds
        ),
        "prune-orphaned-entries": entry(
            "tasks.maintenance.prune_entries", settings.prune_interval_seconds
        ),
        "recheck-rooms": entry(
            "tasks.maintenance.recheck_rooms", settings.room_recheck_interval_seconds
        ),
        "apply-listing-rules": entry(
            "tasks.maintenance.apply_listing_rules", settings.listing_sweep_interval_seconds
        ),
    }


app.conf.beat_schedule = build_schedule()


class LeaderScheduler(PersistentScheduler):
    """Sends scheduled tasks only while holding the leader lock."""

    def __init__(self, *args, **kwargs) -> None:
        self._redis = redis.Redis.from_url(get_settings().redis_url, socket_timeout=5)
        self._lock = Lock(self._redis, LEADER_KEY, LEADER_TTL_MS)
        self._leading = False
        super().__init__(*args, **kwargs)

    def _hold_leadership(self) -> bool:
        try:
            if self._leading and self._lock.extend():
                return True
            self._leading = self._lock.acquire()
        except redis.RedisError:
            logger.warning("beat: Redis unreachable, not sending", exc_info=True)
            self._leading = False
            return False
        if self._leading:
            logger.info("beat: leading on %s", socket.gethostname())
        return self._leading

    def tick(self, *args, **kwargs) -> float:
        if not self._hold_leadership():
            return STANDBY_POLL_SECONDS
        # Never sleep past the lock's expiry.
        return min(super().tick(*args, **kwargs), LEADER_TTL_MS / 3000)

    def close(self) -> None:
        if self._leading:
            with contextlib.suppress(redis.RedisError):
                self._lock.release()
        super().close()
