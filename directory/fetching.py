"""Fetching public profiles for one destination, politely, and applying the answers.

One run holds one of the destination's PER_DESTINATION_CONCURRENCY slots (a Redis
semaphore) and so has at most one request in flight; it claims due users in small
batches from the pending table and works through them until none are due, the
destination backs off, or its time budget ends. The database decides everything:
a claim is a lease on the row, a per-user Redis lock only avoids duplicate requests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from sqlalchemy import Connection, Engine

from directory.clock import now_ms
from directory.config import Settings
from directory.dedup import after_fetch
from directory.events import ProfileValue
from directory.locks import Lock, Semaphore
from directory.membership import next_refresh_ms
from directory.profile_client import FetchResult, Outcome, ProfileClient
from directory.storage import destinations, entries, pending
from directory.storage.pending import Claim

logger = logging.getLogger(__name__)

# A user whose lock is held (another worker is fetching them) is looked at again after
# this long rather than at once, so the two runs do not spin on each other.
LOCK_BUSY_DELAY_MS = 2_000
# Retry-After when a 429 carries none.
DEFAULT_RATE_LIMIT_DELAY_S = 5.0


def slot_key(server_name: str) -> str:
    return f"ud:dest:{server_name}:slots"


def user_lock_key(user_id: str) -> str:
    return f"ud:fetch:{user_id}"


@dataclass
class RunReport:
    acquired_slot: bool = False
    applied: int = 0
    discarded: int = 0
    failed: int = 0
    stopped_by_backoff: bool = False
    out_of_time: bool = False


def user_retry_at(settings: Settings, attempts: int, now: int) -> int | None:
    """When to try a user again after `attempts` failures; None: give up."""
    if attempts >= settings.max_fetch_attempts:
        return None
    delay = settings.fetch_retry_base_seconds * settings.fetch_retry_factor ** (attempts - 1)
    return now + int(min(delay, settings.fetch_retry_max_seconds) * 1000)


def destination_retry_at(settings: Settings, failures: int, now: int) -> int | None:
    """When a destination with `failures` consecutive failures may be tried again."""
    if failures < settings.destination_failure_threshold:
        return None
    delay = settings.destination_backoff_base_seconds * 2 ** (
        failures - settings.destination_failure_threshold
    )
    return now + int(min(delay, settings.destination_backoff_max_seconds) * 1000)


def apply_result(
    conn: Connection, claim: Claim, result: FetchResult, settings: Settings, now: int
) -> str:
    """Record one answer in the caller's transaction; returns what happened."""
    user_id, server = claim.user_id, claim.server_name
    if result.outcome in (Outcome.OK, Outcome.NOT_FOUND, Outcome.FORBIDDEN):
        # 404/403 are answers too: the public profile is nothing we may show, so the
        # entry shows the placeholder. Never a value from an event.
        profile = result.profile if result.outcome is Outcome.OK else None
        profile = profile or ProfileValue(None, None)
        refresh_due = next_refresh_ms(now, settings.profile_max_age_seconds)
        exists = entries.apply_profile(conn, user_id, profile, now, refresh_due)
        ask_again = False
        if exists and result.outcome is Outcome.OK:
            state = entries.seen_states(conn, [user_id])[user_id]
            new_state, ask_again = after_fetch(state, profile)
            if new_state != state:
                entries.save_seen(conn, {user_id: new_state})
        pending.complete(conn, claim)
        if ask_again:
            pending.queue(conn, [user_id], "recheck", now)
        before = destinations.record_success(conn, server, now)
        if before.retry_after_ms is not None:
            revived = pending.revive_given_up(conn, server, now)
            logger.info("destination %s is back; %d users revived", server, revived)
        return "applied" if exists else "discarded"

    error = (result.error or result.outcome.value)[:200]
    if result.outcome is Outcome.RATE_LIMITED:
        delay = result.retry_after_seconds or DEFAULT_RATE_LIMIT_DELAY_S
        pending.postpone(conn, [claim], now + int(delay * 1000), error)
        return "rate_limited"

    attempts = claim.attempts + 1
    pending.record_failure(conn, claim, user_retry_at(settings, attempts, now), error)
    if result.outcome is Outcome.TRANSIENT:
        failures = destinations.health(conn, server).consecutive_failures + 1
        destinations.record_failure(
            conn, server, now, error, destination_retry_at(settings, failures, now)
        )
    return "failed"


class DestinationRun:
    """One worker's turn at one destination."""

    def __init__(
        self,
        engine: Engine,
        redis_client: redis.Redis,
        client: ProfileClient,
        settings: Settings,
    ) -> None:
        self.engine = engine
        self.redis = redis_client
        self.client = client
        self.settings = settings
        self.lease_ms = int(settings.fetch_lease_seconds * 1000)

    def run(self, server_name: str) -> RunReport:
        report = RunReport()
        slot = Semaphore(
            self.redis,
            slot_key(server_name),
            self.settings.per_destination_concurrency,
            self.lease_ms,
        )
        if not slot.acquire():
            return report
        report.acquired_slot = True
        deadline = time.monotonic() + self.settings.fetch_task_budget_seconds
        try:
            while time.monotonic() < deadline:
                claims = self._claim(server_name, report)
                if not claims:
                    break
                if self._work_through(claims, slot, deadline, report):
                    break
        finally:
            slot.release()
        return report

    def _claim(self, server_name: str, report: RunReport) -> list[Claim]:
        now = now_ms()
        with self.engine.begin() as conn:
            retry_after = destinations.health(conn, server_name).retry_after_ms
            if retry_after is not None and retry_after > now:
                report.stopped_by_backoff = True
                return []
            return pending.claim(
                conn, server_name, now, now + self.lease_ms, self.settings.fetch_batch_size
            )

    def _work_through(
        self, claims: list[Claim], slot: Semaphore, deadline: float, report: RunReport
    ) -> bool:
        """Fetch each claimed user; True if the run must stop."""
        for index, claim in enumerate(claims):
            if time.monotonic() >= deadline:
                report.out_of_time = True
                self._give_back(claims[index:], now_ms(), "run out of time")
                return True
            lock = Lock(self.redis, user_lock_key(claim.user_id), self.lease_ms)
            if not lock.acquire():
                self._give_back([claim], now_ms() + LOCK_BUSY_DELAY_MS, None)
                continue
            try:
                result = self.client.fetch(claim.user_id)
                with self.engine.begin() as conn:
                    what = apply_result(conn, claim, result, self.settings, now_ms())
            finally:
                lock.release()
            slot.extend()
            if what == "applied":
                report.applied += 1
            elif what == "discarded":
                report.discarded += 1
            else:
                report.failed += 1
            if result.outcome is Outcome.TRANSIENT and self._backed_off(claim.server_name):
                # The destination is down: the users not yet tried wait with it.
                report.stopped_by_backoff = True
                self._give_back(claims[index + 1 :], now_ms(), None)
                return True
        return False

    def _backed_off(self, server_name: str) -> bool:
        with self.engine.begin() as conn:
            retry_after = destinations.health(conn, server_name).retry_after_ms
        return retry_after is not None and retry_after > now_ms()

    def _give_back(self, claims: list[Claim], when: int, error: str | None) -> None:
        if claims:
            with self.engine.begin() as conn:
                pending.postpone(conn, claims, when, error)
