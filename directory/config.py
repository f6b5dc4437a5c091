"""Settings, read once from the environment.

Every tunable is one environment variable, named here with its default and why that
default; the README lists the same table for operators.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _default_database_url() -> str:
    return f"sqlite:///{PROJECT_ROOT / 'var' / 'directory.sqlite3'}"


def _env_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class Settings:
    # Where the truth lives. SQLite is the embedded default; PostgreSQL is production.
    database_url: str = field(default_factory=_default_database_url)
    # Broker and locks. Everything here may vanish; the database rebuilds it.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Our homeserver's name: users of this server are "local".
    server_name: str = "localhost"
    # Our homeserver's client API; it fetches remote profiles over federation for us.
    homeserver_url: str = "http://127.0.0.1:8008"
    # Token the homeserver gave this appservice (we send it) and the one it sends us.
    as_token: str = ""
    hs_token: str = ""
    # A server admin's access token on Synapse: only the bootstrap uses it, to list
    # every room with the admin API (without it, bootstrap needs --users-file).
    admin_token: str = ""
    # Like Synapse's user_directory.search_all_users: every entry is visible to everyone.
    search_all_users: bool = False
    # Like Synapse's user_directory.exclude_remote_users: searches return only users of
    # SERVER_NAME.
    exclude_remote_users: bool = False
    # Like Synapse's user_directory.prefer_local_users: users of SERVER_NAME rank first
    # within each match tier.
    prefer_local_users: bool = False
    # Each search statement on PostgreSQL is cancelled after this long (the API answers
    # 503): a pathological term cannot hold a connection. 0 disables it.
    search_statement_timeout_ms: int = 2000
    # Who is listed (directory/listing.py). Our registration's sender_localpart: the
    # appservice's own user, never listed.
    sender_localpart: str = "userdirectory"
    # The homeserver's other appservices' registration files (comma-separated): their
    # senders and exclusive user namespaces are never listed, as Synapse does.
    appservice_registration_files: str = ""
    # Users never listed: regexes matched against the whole user id, one per line or
    # comma-separated.
    exclude_user_regexes: str = ""
    # Locked local users (known through ADMIN_TOKEN) are listed all the same.
    show_locked_users: bool = False
    # How often beat judges every entry against the rules again (a worker also does
    # at start, which is when a changed configuration takes effect).
    listing_sweep_interval_seconds: float = 3600.0

    # At most this many profile requests in flight to one destination, across all
    # workers: polite to remote servers, and the fake servers in the benchmark answer
    # 429 beyond 3.
    per_destination_concurrency: int = 3
    # Failed fetches of one user before we give up until the next trigger or refresh.
    max_fetch_attempts: int = 10
    # Backoff between a user's failed fetches: base * factor**(attempts-1), capped.
    # 30 s growing x4 reaches the cap after 6 attempts; 10 attempts span ~1.7 days.
    fetch_retry_base_seconds: float = 30.0
    fetch_retry_factor: float = 4.0
    fetch_retry_max_seconds: float = 6 * 3600.0
    # Quick in-task retries of a transient error (tenacity), kept to seconds so a task
    # never nears the broker's visibility timeout.
    fetch_quick_retries: int = 1
    fetch_quick_retry_wait_seconds: float = 0.5
    # HTTP limits for one profile request. A profile is tiny; anything larger is hostile.
    fetch_connect_timeout_seconds: float = 5.0
    fetch_read_timeout_seconds: float = 15.0
    profile_max_bytes: int = 64 * 1024
    # A destination failing this many times in a row is backed off as a whole, so its
    # users wait together instead of each hammering it.
    destination_failure_threshold: int = 3
    destination_backoff_base_seconds: float = 10.0
    destination_backoff_max_seconds: float = 3600.0
    # Users claimed from the pending table per round trip by one fetch task.
    fetch_batch_size: int = 25
    # How long a claim hides a pending row from other workers. A live run renews its
    # claims (and its slot) every third of this, however long a request takes, so a
    # worker that dies mid-fetch leaves its rows due again within it.
    fetch_lease_seconds: float = 20.0
    # A fetch task stops claiming after this long and re-queues itself, so one task
    # never holds a worker (or the broker's visibility window) for long.
    fetch_task_budget_seconds: float = 60.0

    # Public profiles are re-fetched after this age (MSC4133 advises at most 24 h), each
    # entry at a jittered time so a day's worth does not come due at once.
    profile_max_age_seconds: float = 24 * 3600.0
    # Entries queued for refresh per maintenance run, to spread the load.
    refresh_batch_size: int = 1000
    # How often beat reconciles the pending table with the queue.
    reconcile_interval_seconds: float = 15.0
    # How often beat queues refreshes and prunes orphaned entries.
    refresh_interval_seconds: float = 60.0
    prune_interval_seconds: float = 600.0

    # Threads (or, with WORKER_POOL=prefork, child processes) per worker. A fetch run
    # holds one and has one request in flight, so this caps a worker's fetch rate at
    # concurrency / remote latency: 32 slots and 50 ms answers make 640 profiles/s
    # (with 16, the convergence benchmark ran at 1.38x the politeness bound, with 32
    # at 1.10x; bench/README.md).
    worker_concurrency: int = 32
    # Celery pool: "threads" is light on memory (fetching waits on the network);
    # "prefork" spreads the Python work of fetching over processes and cores.
    worker_pool: str = "threads"
    # Log lines of every process: "text" (readable, the default) or "json" (one object
    # per line with time, level, logger, message and fields such as user_id,
    # server_name, room_id and task_id, for a log collector). Secrets are redacted in
    # both (directory/logs.py).
    log_format: str = "text"

    # The HTTP server (appservice transactions, search, health, metrics).
    http_host: str = "127.0.0.1"
    http_port: int = 9080
    # Search results per request are clamped to this, whatever the client asks.
    search_max_limit: int = 50
    # Per-user search rate: a bucket of SEARCH_RATE_BURST refilled at this rate.
    search_rate_per_second: float = 5.0
    search_rate_burst: int = 20
    # A verified access token is trusted this long before asking the homeserver again;
    # a rejected one is remembered only briefly (it may be brand new on the homeserver).
    token_cache_seconds: float = 60.0
    token_failure_cache_seconds: float = 1.0
    # Searches with no token, a malformed one, or one the homeserver does not know
    # (yet) are limited per client address before we ask the homeserver, so random
    # tokens cannot make us call whoami at any rate: a bucket of this burst refilled
    # at this rate (a verified token gives its token back). IPv6 clients count per /64.
    search_unverified_rate_per_second: float = 1.0
    search_unverified_rate_burst: int = 10
    # The client address is the peer's, or the X-Forwarded-For of a peer listed here
    # (uvicorn's forwarded_allow_ips: comma-separated addresses or networks, or "*").
    forwarded_allow_ips: str = "127.0.0.1,::1"
    # Like Synapse's user_directory.enabled: false answers every (authenticated)
    # search with no results.
    directory_enabled: bool = True
    # The HTTP server's searches use a connection pool of their own, this size (no
    # overflow), so slow searches never take the connections transactions need.
    search_pool_size: int = 5
    # Largest appservice transaction body accepted (Synapse sends at most 100 events).
    max_transaction_bytes: int = 16 * 1024 * 1024
    # Processed transaction ids are remembered this long, to answer replays.
    transaction_retention_seconds: float = 7 * 24 * 3600.0
    # Bootstrap: room reads in flight to our homeserver at once, across all workers.
    # Each is one request; a handful keeps the consumer busy without crowding the
    # homeserver's own traffic.
    bootstrap_concurrency: int = 4
    # Run the bootstrap when a worker starts on a database that knows no rooms.
    bootstrap_on_start: bool = False
    # Reconciliation: every visible room is read again within this long (a missed or
    # lost event is repaired at the latest then), a bounded slice per beat run.
    room_recheck_seconds: float = 7 * 24 * 3600.0
    room_recheck_interval_seconds: float = 60.0
    # Rooms read per run. 100 a minute is 1M rooms a week: every room of a large
    # homeserver within ROOM_RECHECK_SECONDS, at a pace no homeserver notices.
    room_recheck_batch: int = 100

    # Events the inbox consumer applies per database transaction: big batches amortise
    # the fixed cost of a batch's statements (a homeserver's 100-event transactions are
    # merged), small ones hold the rooms' row locks for less time.
    ingest_batch_events: int = 5000

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            if f.type == "bool":
                values[f.name] = _env_bool(raw)
            elif f.type == "int":
                values[f.name] = int(raw)
            elif f.type == "float":
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        # Friendlier names for the two durations operators touch most.
        if env.get("PROFILE_MAX_AGE"):
            values["profile_max_age_seconds"] = float(env["PROFILE_MAX_AGE"])
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.per_destination_concurrency < 1:
            raise ValueError("PER_DESTINATION_CONCURRENCY must be at least 1")
        if self.worker_pool not in ("threads", "prefork"):
            raise ValueError("WORKER_POOL must be threads or prefork")
        if self.log_format not in ("text", "json"):
            raise ValueError("LOG_FORMAT must be text or json")
        if self.ingest_batch_events < 1:
            raise ValueError("INGEST_BATCH_EVENTS must be at least 1")
        if self.max_fetch_attempts < 1:
            raise ValueError("MAX_FETCH_ATTEMPTS must be at least 1")
        if self.search_statement_timeout_ms < 0:
            raise ValueError("SEARCH_STATEMENT_TIMEOUT_MS must be 0 or more")
        if self.search_pool_size < 1:
            raise ValueError("SEARCH_POOL_SIZE must be at least 1")
        if self.search_unverified_rate_per_second <= 0 or self.search_unverified_rate_burst < 1:
            raise ValueError(
                "SEARCH_UNVERIFIED_RATE_PER_SECOND and SEARCH_UNVERIFIED_RATE_BURST must be "
                "positive"
            )
        if self.bootstrap_concurrency < 1:
            raise ValueError("BOOTSTRAP_CONCURRENCY must be at least 1")
        if self.room_recheck_seconds <= 0 or self.room_recheck_batch < 1:
            raise ValueError("ROOM_RECHECK_SECONDS and ROOM_RECHECK_BATCH must be positive")
        if ":" in self.server_name and not self.server_name.rsplit(":", 1)[1].isdigit():
            raise ValueError(f"SERVER_NAME looks wrong: {self.server_name!r}")
        if not self.sender_localpart or any(c in self.sender_localpart for c in ":@ "):
            raise ValueError(f"SENDER_LOCALPART looks wrong: {self.sender_localpart!r}")
        if self.listing_sweep_interval_seconds <= 0:
            raise ValueError("LISTING_SWEEP_INTERVAL_SECONDS must be positive")
        # Unreadable registration files and bad regexes stop every process at start.
        from directory.listing import rules_for

        rules_for(self)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
