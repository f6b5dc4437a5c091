"""Fetching public profiles for one destination, politely, and applying the answers.

One run holds one of the destination's PER_DESTINATION_CONCURRENCY slots (a Redis
semaphore) and so has at most one request in flight; it claims due users in small
batches from the pending table and works through them until none are due, the
destination backs off, or its time budget ends. The database decides everything:
a claim is a lease on the row, a per-user Redis lock only avoids duplicate requests.

Between two requests a run does as little as it can, since that time is the
destination's idle time: a batch's locks are taken and released in one Redis round
trip each, and results are committed in groups (a few statements per group, not per
user) by a committer thread of the run's own while the next request is in flight. A
transient failure is committed before the run goes on, because it may back the
destination off and end the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from directory.clock import now_ms
from directory.config import Settings
from directory.dedup import SeenState, after_fetch
from directory.events import ProfileValue
from directory.listing import ListingRules, rules_for
from directory.locks import LockSet, Semaphore
from directory.membership import next_refresh_ms
from directory.profile_client import FetchResult, Outcome, ProfileClient
from directory.storage import counters, destinations, entries, pending
from directory.storage.pending import Claim
from directory.telemetry import count_fetch

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A user whose lock is held (another worker is fetching them) is looked at again after
# this long rather than at once, so the two runs do not spin on each other.
LOCK_BUSY_DELAY_MS = 2_000
# Retry-After when a 429 carries none.
DEFAULT_RATE_LIMIT_DELAY_S = 5.0
# Results are committed in groups: one transaction per this many results, or per this
# long since the group's first fetch, whichever comes first, so entries appear promptly.
APPLY_GROUP_SIZE = 10
APPLY_GROUP_SECONDS = 0.5
# Result groups a run may fetch ahead of their commit.
MAX_UNCOMMITTED_GROUPS = 2
# A group's transaction chosen as a deadlock victim is tried again this many times in all.
APPLY_ATTEMPTS = 3
LOCK_CONFLICT_SQLSTATES = ("40P01", "40001")  # deadlock detected, serialization failure
# What a run holds (its slot, its claims' leases, their locks) is renewed this often at
# most (and at least three times per FETCH_LEASE_SECONDS): a live run never loses it.
SLOT_EXTEND_INTERVAL_S = 10.0
# A group whose commit failed because the database went away is committed again for
# up to this long (its answers are not fetched again), waiting 0.5 s doubling to 4 s.
COMMIT_RETRY_SECONDS = 60.0
COMMIT_RETRY_FIRST_DELAY_S = 0.5
COMMIT_RETRY_MAX_DELAY_S = 4.0
# Our own homeserver did not serve a request (down, or refusing AS_TOKEN): the run
# stops and its users wait this long, with no attempt counted against anyone.
HOMESERVER_RETRY_DELAY_MS = 5_000
ANSWERS = (Outcome.OK, Outcome.NOT_FOUND, Outcome.FORBIDDEN)


def slot_key(server_name: str) -> str:
    return f"ud:dest:{server_name}:slots"


def user_lock_key(user_id: str) -> str:
    return f"ud:fetch:{user_id}"


@dataclass
class GroupOutcome:
    # Per user: "applied", "discarded" (the user left), "rate_limited" or "failed".
    what: dict[str, str] = field(default_factory=dict)
    # Destinations a TRANSIENT failure in the group backed off.
    backed_off: set[str] = field(default_factory=set)
    # Destinations that were backed off and answered again.
    came_back: set[str] = field(default_factory=set)


@dataclass
class RunReport:
    acquired_slot: bool = False
    applied: int = 0
    discarded: int = 0
    failed: int = 0
    stopped_by_backoff: bool = False
    out_of_time: bool = False
    # Stopped because our own homeserver did not serve a request (the error says why).
    homeserver_error: str | None = None


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


def _shown_profile(result: FetchResult) -> ProfileValue:
    # 404/403 are answers too: the public profile is nothing we may show, so the entry
    # shows the placeholder. Never a value from an event.
    profile = result.profile if result.outcome is Outcome.OK else None
    return profile or ProfileValue(None, None)


def _listing(
    rules: ListingRules, user_id: str, result: FetchResult, target: entries.AnswerTarget
) -> entries.Listing:
    """The entry's listing after this answer. A profile that answered says what its
    MSC4258 visibility is now (absent: no preference); a 404 or 403 says nothing about
    it, so what an earlier answer said stands. Likewise the account's state, unless
    the admin API answered this time."""
    visibility = result.visibility if result.outcome is Outcome.OK else target.profile_visibility
    account = target.account_status
    if result.account is not None and result.account.known:
        account = result.account.state
    reason = rules.reason(user_id, visibility, account)
    return entries.Listing(reason is None, reason, visibility, account)


def log_fetch(claim: Claim, result: FetchResult, seconds: float) -> None:
    """The one line a fetch logs, whatever its outcome, with its parts as fields for
    JSON logs (LOG_FORMAT=json)."""
    duration_ms = round(seconds * 1000, 1)
    fields: dict[str, object] = {
        "user_id": claim.user_id,
        "server_name": claim.server_name,
        "outcome": result.outcome.value,
        "duration_ms": duration_ms,
        "generation": claim.generation,
    }
    if result.error:
        fields["error"] = result.error
    logger.info(
        "fetch of %s: %s in %.0f ms (generation %d)%s",
        claim.user_id,
        result.outcome.value,
        duration_ms,
        claim.generation,
        f": {result.error}" if result.error else "",
        extra=fields,
    )


def _apply_answers(
    conn: Connection,
    answered: Sequence[tuple[Claim, FetchResult]],
    settings: Settings,
    now: int,
    outcome: GroupOutcome,
) -> None:
    """Store OK/404/403 answers, set-based; per user, "applied" or "discarded".

    An answer is applied only to an entry that exists (the user may have left) and
    shows nothing newer: a fetch claimed before a newer one, or before the user left
    and came back, answers an older generation and never overwrites what a newer one
    wrote."""
    # Locked, so an entry found here is still the same entry when its profile is written.
    targets = entries.answer_targets(conn, [claim.user_id for claim, _ in answered])
    fresh = [
        (claim, result)
        for claim, result in answered
        if claim.user_id in targets
        and (
            targets[claim.user_id].fetched_generation is None
            or claim.generation > targets[claim.user_id].fetched_generation
        )
    ]
    profiles = {
        claim.user_id: (_shown_profile(result), claim.generation) for claim, result in fresh
    }
    refresh_due = {
        user_id: next_refresh_ms(now, settings.profile_max_age_seconds) for user_id in profiles
    }
    listing = {
        claim.user_id: _listing(rules_for(settings), claim.user_id, result, targets[claim.user_id])
        for claim, result in fresh
    }
    entries.apply_profiles(conn, profiles, now, refresh_due, listing)
    # Only an answer to the latest trigger judges the value that trigger saw; a newer
    # trigger keeps its row and gets its own fetch.
    latest = pending.current_generations(conn, [claim.user_id for claim, _ in fresh])
    changed: dict[str, SeenState] = {}
    ask_again: list[str] = []
    for claim, result in fresh:
        if result.outcome is not Outcome.OK or latest.get(claim.user_id) != claim.generation:
            continue
        state = targets[claim.user_id].seen
        new_state, again = after_fetch(state, profiles[claim.user_id][0], now)
        if new_state != state:
            changed[claim.user_id] = new_state
        if again:
            ask_again.append(claim.user_id)
    if changed:
        entries.save_seen(conn, changed)
    pending.complete(conn, [claim for claim, _ in answered])
    if ask_again:
        pending.queue(conn, ask_again, "recheck", now)
    for server in sorted({claim.server_name for claim, _ in answered}):
        before = destinations.record_success(conn, server, now)
        if before.retry_after_ms is not None:
            revived = pending.revive_destination(conn, server, now)
            logger.info("destination %s is back; %d users revived", server, revived)
            outcome.came_back.add(server)
    applied = {claim.user_id for claim, _ in fresh}
    outcome.what.update(
        {
            claim.user_id: "applied" if claim.user_id in applied else "discarded"
            for claim, _ in answered
        }
    )


def _postpone_rate_limited(
    conn: Connection, limited: Sequence[tuple[Claim, FetchResult]], now: int
) -> None:
    # A 429 is no failure of the user: no attempt is counted.
    for claim, result in limited:
        delay = result.retry_after_seconds or DEFAULT_RATE_LIMIT_DELAY_S
        error = (result.error or result.outcome.value)[:200]
        pending.postpone(conn, [claim], now + int(delay * 1000), error)


def _record_destination_failure(
    conn: Connection, server: str, error: str, settings: Settings, now: int
) -> bool:
    """Count a transient failure against the whole server; True if it is now backed off."""
    until = destinations.record_failure(
        conn, server, now, error, lambda failures: destination_retry_at(settings, failures, now)
    )
    return until is not None


def apply_results(
    conn: Connection, results: Sequence[tuple[Claim, FetchResult]], settings: Settings, now: int
) -> GroupOutcome:
    """Record a group of answers in the caller's transaction, a few statements for the
    whole group.

    Answers count before failures against the destination, so a TRANSIENT result must
    be the group's last (DestinationRun applies a group as soon as one arrives) for the
    outcome to equal applying the results one by one.
    """
    outcome = GroupOutcome()
    answered = [(c, r) for c, r in results if r.outcome in ANSWERS]
    limited = [(c, r) for c, r in results if r.outcome is Outcome.RATE_LIMITED]
    failed = [(c, r) for c, r in results if r.outcome not in (*ANSWERS, Outcome.RATE_LIMITED)]
    if answered:
        _apply_answers(conn, answered, settings, now, outcome)
    if limited:
        _postpone_rate_limited(conn, limited, now)
        outcome.what.update({claim.user_id: "rate_limited" for claim, _ in limited})
    if failed:
        pending.record_failures(
            conn,
            [
                pending.Failure(
                    claim,
                    user_retry_at(settings, claim.attempts + 1, now),
                    (result.error or result.outcome.value)[:200],
                )
                for claim, result in failed
            ],
        )
        outcome.what.update({claim.user_id: "failed" for claim, _ in failed})
    for claim, result in failed:
        if result.outcome is Outcome.TRANSIENT:
            error = (result.error or result.outcome.value)[:200]
            if _record_destination_failure(conn, claim.server_name, error, settings, now):
                outcome.backed_off.add(claim.server_name)
    return outcome


class _Keeper:
    """Keeps what a live run holds: its semaphore slot, the leases of the users it has
    claimed and not finished, and their per-user locks. A thread of its own renews
    them every third of FETCH_LEASE_SECONDS, however long a request takes; a run that
    dies stops renewing, and everything it held comes back within the lease.

    Claims leave the held set before their outcome is written (a commit, a give-back)
    and under the same mutex as a renewal, so a renewal never overwrites a retry time
    or a give-back's delay."""

    def __init__(self, engine: Engine, slot: Semaphore, lease_ms: int) -> None:
        self.engine = engine
        self.slot = slot
        self.lease_ms = lease_ms
        self.interval = min(SLOT_EXTEND_INTERVAL_S, lease_ms / 1000 / 3)
        self.mutex = threading.Lock()
        self.held: dict[str, Claim] = {}
        self.locks: list[LockSet] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fetch-keeper", daemon=True)
        self._thread.start()

    def hold(self, claims: Sequence[Claim]) -> None:
        with self.mutex:
            self.held.update((claim.user_id, claim) for claim in claims)

    def let_go(self, claims: Sequence[Claim]) -> None:
        with self.mutex:
            for claim in claims:
                if self.held.get(claim.user_id) == claim:
                    del self.held[claim.user_id]

    def holding(self) -> list[Claim]:
        with self.mutex:
            return list(self.held.values())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.renew()

    def renew(self) -> None:
        # Each part on its own: Redis or the database being away (and back) must not
        # keep the other from being renewed.
        try:
            self.slot.extend()
            for locks in list(self.locks):
                locks.extend()
        except redis.RedisError:
            logger.debug("could not renew a run's slot or locks", exc_info=True)
        with self.mutex:
            claims = list(self.held.values())
            if not claims:
                return
            try:
                with self.engine.begin() as conn:
                    pending.extend_leases(conn, claims, now_ms() + self.lease_ms)
            except DBAPIError:
                logger.debug("could not renew a run's leases", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _Committer:
    """Runs a run's commits in order on a thread of its own, so the next request does
    not wait for the database: with dozens of threads sharing the GIL, a group's
    transaction took a third of a slot's time, time the destination sat idle."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch-commit")
        self._pending: deque[Future[Any]] = deque()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future = self._executor.submit(fn, *args)
        self._pending.append(future)
        # The run stays at most this far ahead of the database, and a failed commit
        # ends it soon.
        while len(self._pending) > MAX_UNCOMMITTED_GROUPS:
            self._pending.popleft().result()
        return future

    def wait(self) -> None:
        """Until everything submitted is done; raises the first error."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass
class _Turn:
    """What one run carries from batch to batch."""

    keeper: _Keeper
    committer: _Committer
    deadline: float
    report: RunReport


class DestinationRun:
    """One worker's turn at one destination."""

    def __init__(
        self,
        engine: Engine,
        redis_client: redis.Redis,
        client: ProfileClient,
        settings: Settings,
        on_back: Callable[[str], object] = lambda _server: None,
    ) -> None:
        self.engine = engine
        self.redis = redis_client
        self.client = client
        self.settings = settings
        self.lease_ms = int(settings.fetch_lease_seconds * 1000)
        # Called (from the committer's thread) when a backed-off destination answers
        # again: its other slots' runs were stopped by the backoff and must start again.
        self.on_back = on_back

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
        turn = _Turn(
            keeper=_Keeper(self.engine, slot, self.lease_ms),
            committer=_Committer(),
            deadline=time.monotonic() + self.settings.fetch_task_budget_seconds,
            report=report,
        )
        try:
            while time.monotonic() < turn.deadline:
                claims = self._claim(server_name, report)
                if not claims:
                    break
                turn.keeper.hold(claims)
                if self._work_through(claims, turn):
                    break
        finally:
            # Every result is committed before the run reports (and the task looks
            # at what is still due); whatever the run still holds unfetched, because
            # it failed (Redis or the database away), is handed back at once.
            try:
                turn.committer.wait()
            finally:
                turn.committer.close()
                turn.keeper.close()
                self._hand_back(turn.keeper.holding())
                with contextlib.suppress(redis.RedisError):
                    slot.release()
        return report

    def _claim(self, server_name: str, report: RunReport) -> list[Claim]:
        now = now_ms()
        limit = self.settings.fetch_batch_size
        with self.engine.begin() as conn:
            retry_after = destinations.health(conn, server_name).retry_after_ms
            if retry_after is not None:
                # Backed off: wait; once the backoff ends, one run asks for one user (a
                # probe) while the others keep waiting, so a server that is still down
                # costs one request per backoff and one more failure, not one per slot.
                probing = retry_after <= now and destinations.take_probe(
                    conn, server_name, now, now + self.lease_ms
                )
                if not probing:
                    report.stopped_by_backoff = True
                    return []
                limit = 1
            return pending.claim(conn, server_name, now, now + self.lease_ms, limit)

    def _work_through(self, claims: list[Claim], turn: _Turn) -> bool:
        """Fetch the claimed users whose lock we get; True if the run must stop."""
        locks = LockSet(self.redis, self.lease_ms)
        turn.keeper.locks.append(locks)
        try:
            taken = locks.acquire([user_lock_key(claim.user_id) for claim in claims])
            busy = [claim for claim, ok in zip(claims, taken, strict=True) if not ok]
            # Another worker is fetching them: look again once it is likely done.
            self._give_back(turn, busy, now_ms() + LOCK_BUSY_DELAY_MS, None)
            mine = [claim for claim, ok in zip(claims, taken, strict=True) if ok]
            return self._fetch_all(mine, turn)
        finally:
            # Queued after the batch's commits, so nobody fetches a user again before
            # the database shows the answer.
            turn.committer.submit(self._release_locks, turn.keeper, locks)

    @staticmethod
    def _release_locks(keeper: _Keeper, locks: LockSet) -> None:
        keeper.locks.remove(locks)
        with contextlib.suppress(redis.RedisError):
            locks.release()

    def _fetch_all(self, claims: list[Claim], turn: _Turn) -> bool:
        group: list[tuple[Claim, FetchResult]] = []
        # The group's fetches for /metrics (directory/telemetry.py), committed with it.
        tally: Counter[str] = Counter()
        group_started = time.monotonic()
        for index, claim in enumerate(claims):
            if time.monotonic() >= turn.deadline:
                turn.report.out_of_time = True
                turn.committer.submit(self._commit, group, turn, tally)
                self._give_back(turn, claims[index:], now_ms(), "run out of time")
                return True
            if not group:
                group_started = time.monotonic()
            started = time.monotonic()
            result = self.client.fetch(claim.user_id)
            count_fetch(tally, result, time.monotonic() - started)
            log_fetch(claim, result, time.monotonic() - started)
            result = self._with_account(claim, result)
            if result.outcome is Outcome.HOMESERVER:
                # Nothing is known about this user or their server: no attempt is
                # counted and nobody is backed off; everyone waits for our homeserver.
                turn.report.homeserver_error = result.error
                turn.committer.submit(self._commit, group, turn, tally)
                turn.committer.wait()
                delay_until = now_ms() + HOMESERVER_RETRY_DELAY_MS
                self._give_back(turn, claims[index:], delay_until, result.error)
                return True
            group.append((claim, result))
            if result.outcome is Outcome.TRANSIENT:
                # Committed before going on: it may back the destination off, and then
                # the users not yet tried wait with it.
                if turn.committer.submit(self._commit, group, turn, tally).result():
                    turn.report.stopped_by_backoff = True
                    self._give_back(turn, claims[index + 1 :], now_ms(), None)
                    return True
                group, tally = [], Counter()
            elif (
                len(group) >= APPLY_GROUP_SIZE
                or time.monotonic() - group_started >= APPLY_GROUP_SECONDS
            ):
                turn.committer.submit(self._commit, group, turn, tally)
                group, tally = [], Counter()
        turn.committer.submit(self._commit, group, turn, tally)
        return False

    def _with_account(self, claim: Claim, result: FetchResult) -> FetchResult:
        """A local user's answer, with what Synapse's admin API says of their account
        (deactivated, support, locked: directory/listing.py) when ADMIN_TOKEN is set.
        Asked whenever their profile is, so a refresh asks again; a failed lookup
        leaves what an earlier one said."""
        if (
            not self.settings.admin_token
            or claim.server_name != self.settings.server_name
            or result.outcome not in ANSWERS
        ):
            return result
        account = self.client.account(claim.user_id)
        if not account.known:
            logger.warning(
                "could not ask the admin API about %s: %s",
                claim.user_id,
                account.error,
                extra={"user_id": claim.user_id, "error": account.error},
            )
        return dataclasses.replace(result, account=account)

    def _commit(
        self,
        group: list[tuple[Claim, FetchResult]],
        turn: _Turn,
        tally: Counter[str] | None = None,
    ) -> bool:
        """Commit the group's results (on the committer's thread), and `tally`, what
        its fetches count for /metrics, in the same transaction; True if the
        destination backed off.

        Answers already fetched are worth keeping: if the database is away (a
        restart), the commit is tried again until it succeeds or the wait would
        outlast COMMIT_RETRY_SECONDS, rather than the users being fetched again."""
        if not group and not tally:
            return False
        claims = [claim for claim, _ in group]
        give_up_at = time.monotonic() + COMMIT_RETRY_SECONDS
        delay = COMMIT_RETRY_FIRST_DELAY_S
        attempt = 0
        while True:
            attempt += 1
            # Out of the held set while its outcome is written: the keeper must not
            # renew a lease the commit is replacing with a retry time.
            turn.keeper.let_go(claims)
            try:
                with self.engine.begin() as conn:
                    outcome = apply_results(conn, group, self.settings, now_ms())
                    # Last in the transaction: these rows are shared by every run.
                    counters.add(conn, tally or {}, sharded=True)
                break
            except DBAPIError as exc:
                turn.keeper.hold(claims)
                if _is_lock_conflict(exc) and attempt < APPLY_ATTEMPTS:
                    # Another transaction locked the same rows in another order; the
                    # database chose us to give way. Nothing was written: try again.
                    continue
                if not exc.connection_invalidated and not isinstance(exc, OperationalError):
                    raise
                if time.monotonic() + delay > give_up_at:
                    raise
                logger.warning(
                    "committing fetched profiles failed (%s); again in %.1f s", exc, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, COMMIT_RETRY_MAX_DELAY_S)
        for server in outcome.came_back:
            self.on_back(server)
        report = turn.report
        for what in outcome.what.values():
            if what == "applied":
                report.applied += 1
            elif what == "discarded":
                report.discarded += 1
            else:
                report.failed += 1
        return bool(outcome.backed_off)

    def _give_back(self, turn: _Turn, claims: list[Claim], when: int, error: str | None) -> None:
        if claims:
            turn.keeper.let_go(claims)
            with self.engine.begin() as conn:
                pending.postpone(conn, claims, when, error)

    def _hand_back(self, claims: list[Claim]) -> None:
        """A failed run's unfetched claims, due again now. If the database is away,
        their leases end them soon anyway."""
        if not claims:
            return
        try:
            with self.engine.begin() as conn:
                pending.postpone(conn, claims, now_ms(), "the run that claimed it failed")
            logger.warning("a failed fetch run handed back %d users", len(claims))
        except DBAPIError:
            logger.warning("a failed fetch run could not hand back %d users", len(claims))


def _is_lock_conflict(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in LOCK_CONFLICT_SQLSTATES
