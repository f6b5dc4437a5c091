"""The fault bed: the service's real processes (HTTP server, worker, beat) on a
PostgreSQL cluster and a Redis of the bed's own, which the tests kill, restart and
flush, against a fake federation (FakeHomeserver) of many remote servers.

A workload is a population of remote users joining rooms that have a local member,
sent as appservice transactions over HTTP, one at a time as a homeserver sends them.
It has converged when every user's entry shows the public profile the fake serves.
Every figure a case asserts is measured against the same workload run without a
fault, in the same session (the machine is shared and noisy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select

from directory.config import Settings
from directory.db import make_engine
from directory.models import room_members, user_directory
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.private_postgres import PrivatePostgres, postgres_bindir
from tests.support.processes import ProcessGroup, wait_until
from tests.support.services import PrivateRedis, free_port

LOCAL_SERVER = "ours.test"
LOCAL_USER = f"@bob:{LOCAL_SERVER}"
HS_TOKEN = "fault-hs-token"
AS_TOKEN = "fault-as-token"
EVENTS_PER_TRANSACTION = 100
CONVERGE_TIMEOUT_S = 120
# Faults strike once this share of the users has converged: mid-run, with claims in
# hand, fetches in flight and work still queued.
STRIKE_AT = 0.4
_run_ids = itertools.count(1)

needs_postgres = pytest.mark.skipif(
    postgres_bindir() is None, reason="initdb is not installed: no private PostgreSQL"
)


@dataclass(frozen=True)
class Workload:
    users: int
    servers: int
    latency_s: float
    rooms: int = 20
    # Each remote server answers 429 beyond this many requests in flight.
    max_concurrent: int = 3

    def user_ids(self) -> list[str]:
        return [f"@user{i}:server{i % self.servers}.test" for i in range(self.users)]

    def public_name(self, user_id: str) -> str:
        return "Public " + user_id.split(":")[0].lstrip("@")

    def transactions(self) -> list[list[dict]]:
        """The rooms (a local member each), then every user joining one, with a
        per-room name that must never show."""
        events: list[dict] = []
        for k in range(self.rooms):
            room = f"!room{k}:{LOCAL_SERVER}"
            events += [member(room, LOCAL_USER), join_rules(room, "invite")]
        for i, user_id in enumerate(self.user_ids()):
            room = f"!room{i % self.rooms}:{LOCAL_SERVER}"
            events.append(member(room, user_id, displayname=f"Nick {i}"))
        return [
            events[start : start + EVENTS_PER_TRANSACTION]
            for start in range(0, len(events), EVENTS_PER_TRANSACTION)
        ]


@dataclass
class Outcome:
    seconds: float
    lost: int  # users whose entry never showed their public profile
    missing: int  # users of transactions answered 200 that no membership shows
    duplicates: int  # users asked for more than once
    requests: int
    rate_limited: int
    extra: dict[str, object] = field(default_factory=dict)

    def row(self) -> str:
        return (
            f"{self.seconds:.1f} s, lost {self.lost}, missing {self.missing},"
            f" duplicates {self.duplicates}/{self.requests}, 429s {self.rate_limited}"
        )


class FaultBed:
    """One bed per test: its own PostgreSQL, Redis, fake federation and processes."""

    def __init__(self, workdir: Path, workload: Workload, **settings: object) -> None:
        self.workdir = workdir
        self.workload = workload
        self.postgres = PrivatePostgres()
        self.postgres.create()
        self.redis = PrivateRedis(workdir)
        self.redis.start()
        self.homeserver = FakeHomeserver()
        self.homeserver.start()
        self.homeserver.set_token(AS_TOKEN, f"@userdirectory:{LOCAL_SERVER}")
        self.http_port = free_port()
        base = Settings(
            database_url=self.postgres.url,
            redis_url=self.redis.url,
            server_name=LOCAL_SERVER,
            homeserver_url=self.homeserver.url,
            as_token=AS_TOKEN,
            hs_token=HS_TOKEN,
            http_port=self.http_port,
            fetch_connect_timeout_seconds=2.0,
            fetch_read_timeout_seconds=5.0,
        )
        self.settings = dataclasses.replace(base, **settings)  # type: ignore[arg-type]
        self.processes = ProcessGroup(self.settings, workdir)
        self.engine: Engine = make_engine(self.postgres.url)
        for user_id in workload.user_ids():
            self.homeserver.set_profile(user_id, workload.public_name(user_id))
        for s in range(workload.servers):
            self.homeserver.set_server(
                f"server{s}.test",
                latency=workload.latency_s,
                max_concurrent=workload.max_concurrent,
            )
        self.answered: list[list[dict]] = []

    # -- running -------------------------------------------------------------------

    def start(self, workers: int = 1, beat: bool = True) -> None:
        self.processes.start_server()
        for n in range(workers):
            self.processes.start_worker(f"worker{n + 1}")
        if beat:
            self.processes.start_beat()

    def send_all(self, during: Callable[[int], None] | None = None) -> float:
        """Send the workload's transactions, one at a time; `during(i)` runs before the
        i-th. Returns when the first was sent (time.monotonic())."""
        prefix = f"t{next(_run_ids)}"
        started = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30) as client:
            for i, events in enumerate(self.workload.transactions()):
                if during is not None:
                    during(i)
                self.put(client, f"{prefix}-{i}", events)
        return started

    def put(self, client: httpx.Client, txn_id: str, events: list[dict]) -> None:
        """PUT one transaction until it is answered 200, as a homeserver retries."""
        deadline = time.monotonic() + 120
        while True:
            try:
                response = client.put(
                    f"/_matrix/app/v1/transactions/{txn_id}",
                    json={"events": events},
                    headers={"Authorization": f"Bearer {HS_TOKEN}"},
                )
                if response.status_code == 200:
                    self.answered.append(events)
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"transaction {txn_id} never answered 200")
            time.sleep(0.2)

    # -- measuring -----------------------------------------------------------------

    def shown(self) -> dict[str, str | None]:
        with self.engine.connect() as conn:
            return dict(
                conn.execute(
                    select(user_directory.c.user_id, user_directory.c.display_name).where(
                        user_directory.c.fetched_at_ms.is_not(None)
                    )
                ).all()
            )

    def converged_count(self) -> int:
        expected = {u: self.workload.public_name(u) for u in self.workload.user_ids()}
        try:
            shown = self.shown()
        except Exception:
            return -1  # the database is away: not converged yet
        return sum(1 for user, name in expected.items() if shown.get(user) == name)

    def wait_converged(self, started: float, timeout: float) -> Outcome:
        total = self.workload.users
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: self.converged_count() == total,
                timeout,
                interval=0.25,
                what="every user to show their public profile",
            )
        seconds = time.monotonic() - started
        return self.outcome(seconds)

    def outcome(self, seconds: float) -> Outcome:
        converged = max(0, self.converged_count())
        requests = Counter(r.user_id for r in self.homeserver.requests if r.user_id)
        with self.engine.connect() as conn:
            members = set(conn.scalars(select(room_members.c.user_id)))
        answered_users = {
            e["state_key"]
            for events in self.answered
            for e in events
            if e["type"] == "m.room.member" and e["state_key"] != LOCAL_USER
        }
        return Outcome(
            seconds=seconds,
            lost=self.workload.users - converged,
            missing=len(answered_users - members),
            duplicates=sum(1 for n in requests.values() if n > 1),
            requests=sum(requests.values()),
            rate_limited=self.homeserver.rate_limited_count(),
        )

    def close(self) -> None:
        self.processes.kill_all()
        self.homeserver.stop()
        self.engine.dispose()
        self.redis.stop()
        self.postgres.destroy()


_baselines: dict[Workload, Outcome] = {}


def baseline(
    make_bed: Callable[..., FaultBed], workload: Workload, timeout: float = CONVERGE_TIMEOUT_S
) -> Outcome:
    """The workload without a fault, measured once per session."""
    if workload not in _baselines:
        bed = make_bed(workload, name="baseline")
        bed.start()
        outcome = bed.wait_converged(bed.send_all(), timeout)
        assert outcome.lost == 0 and outcome.missing == 0, outcome
        _baselines[workload] = outcome
        bed.close()
    return _baselines[workload]


def strike_when_under_way(bed: FaultBed, fault: Callable[[], None]) -> float:
    """Send the workload; once STRIKE_AT of it has converged, run `fault`. Returns the
    start time."""
    started = bed.send_all()
    target = int(bed.workload.users * STRIKE_AT)
    wait_until(lambda: bed.converged_count() >= target, CONVERGE_TIMEOUT_S, 0.05)
    fault()
    return started


def report(name: str, base: Outcome, fault: Outcome) -> None:
    """Both runs' figures, shown with `pytest -s` (make soak)."""
    print(f"\n{name}: no fault {base.row()}\n{name}: fault    {fault.row()}")


@pytest.fixture
def make_bed(tmp_path: Path) -> Iterator[Callable[..., FaultBed]]:
    beds: list[FaultBed] = []

    def make(workload: Workload, name: str = "bed", **settings: object) -> FaultBed:
        workdir = tmp_path / name
        workdir.mkdir()
        bed = FaultBed(workdir, workload, **settings)
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        bed.close()
