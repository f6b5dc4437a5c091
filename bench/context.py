"""What every phase shares: sizes, services, processes, and small measuring helpers."""

from __future__ import annotations

import http.client
import math
import os
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.infra import Database, Fake, PrivateRedis, Processes, free_port, wait_until
from bench.population import LOCAL_SERVER

AS_TOKEN = "bench-as-token"
HS_TOKEN = "bench-hs-token"
# A server admin's token on the fake homeserver: the bootstrap lists rooms with it.
ADMIN_TOKEN = "bench-admin-token"


@dataclass
class Sizes:
    ingest_events: int = 200_000
    ingest_rooms: int = 2_000
    ingest_users: int = 20_000
    txn_events: int = 100
    users: int = 20_000
    servers: int = 200
    latency_ms: float = 50.0
    max_concurrent: int = 3
    workers: tuple[int, ...] = (1, 2)
    # The service's defaults (WORKER_CONCURRENCY, WORKER_POOL).
    worker_concurrency: int = 32
    worker_pool: str = "threads"
    dedup_rooms: int = 1_000
    dedup_users: int = 50
    dedup_user_rooms: int = 200
    search_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    search_queries: int = 600
    steady_seconds: float = 30.0
    steady_rate: float = 500.0
    rss_fetches: int = 200_000
    rss_latency_ms: float = 0.0
    # The homeserver the bootstrap loads: rooms x members memberships; remote members
    # are drawn from this many users on `servers` servers.
    bootstrap_rooms: int = 10_000
    bootstrap_members: int = 50
    bootstrap_users: int = 50_000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            ingest_events=4_000,
            ingest_rooms=100,
            ingest_users=1_000,
            users=1_000,
            servers=20,
            dedup_rooms=100,
            dedup_users=5,
            dedup_user_rooms=20,
            search_sizes=(2_000, 20_000),
            search_queries=100,
            steady_seconds=5.0,
            rss_fetches=4_000,
            bootstrap_rooms=300,
            bootstrap_members=20,
            bootstrap_users=2_000,
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Context:
    root: Path
    logdir: Path
    sizes: Sizes
    db: Database = field(default_factory=Database)
    redis: PrivateRedis | None = None
    procs: Processes | None = None
    fake: Fake | None = None
    env: dict[str, str] = field(default_factory=dict)
    server_url: str = ""
    fake_url: str = ""
    # The run's time budget (time.monotonic()), and how much of it the phases still to
    # come need: only the memory run is elastic, and it stops in time for them.
    deadline: float = math.inf
    reserve_seconds: float = 0.0

    def time_left(self) -> float:
        return self.deadline - self.reserve_seconds - time.monotonic()

    def start_services(self) -> None:
        self.db.create()
        self.redis = PrivateRedis(self.logdir)
        self.redis.start()
        fake_port, http_port = free_port(), free_port()
        self.fake_url = f"http://127.0.0.1:{fake_port}"
        self.server_url = f"http://127.0.0.1:{http_port}"
        service = {
            "DATABASE_URL": self.db.url,
            "REDIS_URL": self.redis.url,
            "SERVER_NAME": LOCAL_SERVER,
            "HOMESERVER_URL": self.fake_url,
            "AS_TOKEN": AS_TOKEN,
            "HS_TOKEN": HS_TOKEN,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(http_port),
            "WORKER_CONCURRENCY": str(self.sizes.worker_concurrency),
            "PER_DESTINATION_CONCURRENCY": str(self.sizes.max_concurrent),
            # The benchmark's searchers are few and fast: the per-user rate limit is not
            # what the search measurement is about (its Redis round trip still runs).
            "SEARCH_RATE_PER_SECOND": "100000",
            "SEARCH_RATE_BURST": "100000",
        }
        # Every other setting keeps the operator's environment (or its default); the
        # effective values are recorded with the results.
        self.env = {**os.environ, **service}
        # This process runs some of the service's own code too (publishing due work,
        # building search statements), configured exactly like its children.
        os.environ.update(service)
        self.db.migrate(self.env, self.logdir / "migrate.log")
        self.procs = Processes(self.logdir, self.env)
        self.procs.start_fake(fake_port)
        self.fake = Fake(self.fake_url)
        self.procs.start_server()

    def reset_state(self) -> None:
        """Between phases: no workers, empty tables, empty Redis, fresh counters."""
        assert self.procs and self.redis and self.fake
        self.procs.stop_matching("worker")
        self.procs.stop_matching("beat")
        self.db.truncate_all()
        self.redis.flush()
        self.fake.configure(self.sizes.latency_ms, self.sizes.max_concurrent)
        self.fake.reset()

    def start_workers(
        self, count: int, concurrency: int | None = None, queues: str | None = None
    ) -> list[str]:
        assert self.procs
        names = [f"worker{i + 1}" for i in range(count)]
        for name in names:
            concurrency = concurrency or self.sizes.worker_concurrency
            options = ["-P", self.sizes.worker_pool, "-c", str(concurrency)]
            if queues:
                options += ["-Q", queues]
            self.procs.start_worker(name, *options, wait=False)
        for name in names:
            self.procs.wait_for_log(name, b" ready.")
        return names

    def http(self) -> TransactionSender:
        return TransactionSender(self.server_url)

    def send_transactions(
        self, client: TransactionSender, bodies: Iterable[bytes], prefix: str
    ) -> list[float]:
        """PUT each body as one appservice transaction, one at a time as a homeserver
        does; returns each transaction's round trip in seconds."""
        latencies = []
        for i, body in enumerate(bodies):
            started = time.perf_counter()
            status, text = client.put(f"/_matrix/app/v1/transactions/{prefix}-{i}", body)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"transaction {prefix}-{i}: HTTP {status} {text[:200]}")
        return latencies

    def scalar(self, sql: str, *params: Any) -> Any:
        with self.db.connect(autocommit=True) as conn:
            row = conn.execute(sql, params or None).fetchone()
            return row[0] if row else None

    def wait_quiet(self, timeout: float, quiet_seconds: float = 2.0) -> None:
        """Until nothing is waiting in the inbox, pending or awaiting backfill, and the
        fake has seen no request for `quiet_seconds`: the system has done everything it
        was asked."""
        assert self.fake

        def quiet() -> bool:
            if (
                self.scalar("SELECT count(*) FROM event_inbox")
                or self.scalar("SELECT count(*) FROM pending_fetches")
                or self.scalar("SELECT count(*) FROM rooms WHERE backfill_as IS NOT NULL")
            ):
                return False
            stats = self.fake.stats()
            last = stats["last_request"] or 0
            return stats["now"] - last >= quiet_seconds

        wait_until(quiet, timeout, 0.25, "the pipeline to go quiet")


class TransactionSender:
    """The homeserver's side of appservice transactions: one keep-alive connection,
    one PUT at a time. http.client rather than httpx: the sender shares the machine's
    two cores with what it measures, and httpx costs about 0.9 ms of CPU per request
    more, which a one-at-a-time sender adds to every round trip."""

    def __init__(self, base_url: str) -> None:
        url = urllib.parse.urlsplit(base_url)
        self._connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        self._headers = {
            "Authorization": f"Bearer {HS_TOKEN}",
            "Content-Type": "application/json",
        }

    def put(self, path: str, body: bytes) -> tuple[int, str]:
        try:
            return self._put(path, body)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed the idle connection (uvicorn's keep-alive timeout); a
            # transaction is idempotent by its id, so sending it again is safe.
            self._connection.close()
            return self._put(path, body)

    def _put(self, path: str, body: bytes) -> tuple[int, str]:
        self._connection.request("PUT", path, body=body, headers=self._headers)
        response = self._connection.getresponse()
        return response.status, response.read().decode(errors="replace")

    def __enter__(self) -> TransactionSender:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._connection.close()
