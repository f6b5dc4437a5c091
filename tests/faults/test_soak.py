"""The longer faults (`make soak`, also run by CI), at the size they were first tried at:
5,000 users on 50 remote servers answering in 200 ms, 3 requests at a time each.

For each: every user converges (lost = 0), every transaction answered 200 is applied
(missing = 0), duplicate requests stay bounded, and convergence takes at most the same
workload's time without a fault, measured in the same session, plus a bound:
- PostgreSQL restarted with -m immediate (no checkpoint, WAL recovery): + 20 s and
  duplicates <= 1 % (answers whose commit failed are committed again);
- PostgreSQL stopped for 15 s: + 15 s + 20 s;
- Redis down while the homeserver sends everything (transactions are still answered
  200, from the database), back empty 10 s later: + 10 s + 20 s;
- beat killed mid-run: + 20 s; two beats: one leads, nothing is sent twice;
- every transaction sent 10 times at once: applied once, nobody fetched twice;
- a 500-user server answering 502 for 60 s: its users wait together (one shared
  backoff, counted atomically) and converge within the backoff in force when it comes
  back plus the time its users take at its politeness limit, plus 15 s.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import func, select

from directory.models import appservice_transactions, destinations
from tests.faults.conftest import (
    HS_TOKEN,
    FaultBed,
    Outcome,
    Workload,
    baseline,
    needs_postgres,
    report,
    strike_when_under_way,
)
from tests.support.processes import wait_until
from tests.support.services import selected_backend

pytestmark = [
    pytest.mark.soak,
    needs_postgres,
    pytest.mark.skipif(
        selected_backend() != "postgresql", reason="the fault bed runs its own PostgreSQL"
    ),
]

SOAK = Workload(users=5_000, servers=50, latency_s=0.2, rooms=100)
SOAK_TIMEOUT_S = 400


def run_with(bed: FaultBed, fault: Callable[[], None]) -> Outcome:
    bed.start()
    return bed.wait_converged(strike_when_under_way(bed, fault), SOAK_TIMEOUT_S)


def check(outcome: Outcome) -> None:
    assert outcome.lost == 0, outcome
    assert outcome.missing == 0, outcome
    assert outcome.rate_limited == 0, outcome


def test_postgresql_immediate_restart(make_bed: Callable[..., FaultBed]) -> None:
    base = baseline(make_bed, SOAK, SOAK_TIMEOUT_S)
    bed = make_bed(SOAK, name="fault")
    outcome = run_with(bed, lambda: bed.postgres.restart("immediate"))
    report("PostgreSQL restart -m immediate", base, outcome)
    check(outcome)
    assert outcome.seconds <= base.seconds + 20
    assert outcome.duplicates <= SOAK.users // 100


def test_postgresql_down_for_15_seconds(make_bed: Callable[..., FaultBed]) -> None:
    base = baseline(make_bed, SOAK, SOAK_TIMEOUT_S)
    bed = make_bed(SOAK, name="fault")
    outcome = run_with(bed, lambda: bed.postgres.restart("fast", down_seconds=15))
    report("PostgreSQL down 15 s", base, outcome)
    check(outcome)
    assert outcome.seconds <= base.seconds + 15 + 20
    assert outcome.duplicates <= SOAK.users // 100


def test_redis_down_while_the_homeserver_sends(make_bed: Callable[..., FaultBed]) -> None:
    base = baseline(make_bed, SOAK, SOAK_TIMEOUT_S)
    bed = make_bed(SOAK, name="fault")
    bed.start()
    bed.redis.stop()
    started = bed.send_all()  # every transaction still answered 200: the inbox is SQL
    time.sleep(max(0.0, 10 - (time.monotonic() - started)))
    bed.redis.start()
    outcome = bed.wait_converged(started, SOAK_TIMEOUT_S)
    report("Redis down during ingest", base, outcome)
    check(outcome)
    assert outcome.seconds <= base.seconds + 10 + 20
    assert outcome.duplicates <= SOAK.users // 100


def test_beat_killed_mid_run(make_bed: Callable[..., FaultBed]) -> None:
    base = baseline(make_bed, SOAK, SOAK_TIMEOUT_S)
    bed = make_bed(SOAK, name="fault")
    outcome = run_with(bed, lambda: bed.processes.kill("beat", signal.SIGKILL))
    report("beat SIGKILL", base, outcome)
    check(outcome)
    assert outcome.seconds <= base.seconds + 20
    assert outcome.duplicates <= SOAK.users // 100


def test_two_beats_send_nothing_twice(make_bed: Callable[..., FaultBed]) -> None:
    base = baseline(make_bed, SOAK, SOAK_TIMEOUT_S)
    bed = make_bed(SOAK, name="fault")
    bed.start()
    bed.processes.start_beat("beat2")
    outcome = bed.wait_converged(bed.send_all(), SOAK_TIMEOUT_S)
    report("two beats", base, outcome)
    check(outcome)
    leading = [name for name in ("beat", "beat2") if "beat: leading" in bed.processes.log(name)]
    assert len(leading) == 1
    assert outcome.seconds <= base.seconds + 20
    assert outcome.duplicates <= SOAK.users // 100


def test_every_transaction_replayed_ten_times_at_once(make_bed: Callable[..., FaultBed]) -> None:
    base = baseline(make_bed, SOAK, SOAK_TIMEOUT_S)
    bed = make_bed(SOAK, name="fault")
    bed.start()
    transactions = SOAK.transactions()
    started = time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{bed.http_port}", timeout=60) as client:
        for i, events in enumerate(transactions):
            statuses: list[int] = []

            def put(
                events: list[dict] = events,
                txn: str = f"replayed-{i}",
                statuses: list[int] = statuses,
            ) -> None:
                response = client.put(
                    f"/_matrix/app/v1/transactions/{txn}",
                    json={"events": events},
                    headers={"Authorization": f"Bearer {HS_TOKEN}"},
                )
                statuses.append(response.status_code)

            threads = [threading.Thread(target=put) for _ in range(10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert statuses == [200] * 10
            bed.answered.append(events)
    outcome = bed.wait_converged(started, SOAK_TIMEOUT_S)
    report("10 concurrent replays", base, outcome)
    check(outcome)
    assert outcome.duplicates == 0
    with bed.engine.connect() as conn:
        recorded = conn.scalar(select(func.count()).select_from(appservice_transactions))
    assert recorded == len(transactions)


def test_a_dead_server_is_waited_for_together_and_converges_when_back(
    make_bed: Callable[..., FaultBed],
) -> None:
    workload = Workload(users=5_000, servers=10, latency_s=0.05, rooms=100)
    bed = make_bed(workload, name="fault")
    dead = "server0.test"  # 500 of the users
    bed.homeserver.set_server(dead, down=True)
    bed.start()
    started = bed.send_all()
    others = [u for u in workload.user_ids() if not u.endswith(":" + dead)]

    def live_servers_converged() -> bool:
        shown = bed.shown()
        return all(shown.get(u) == workload.public_name(u) for u in others)

    wait_until(live_servers_converged, SOAK_TIMEOUT_S, 0.5, what="the live servers' users")
    time.sleep(max(0.0, 60 - (time.monotonic() - started)))
    with bed.engine.connect() as conn:
        health = conn.execute(select(destinations).where(destinations.c.server_name == dead)).one()
    backoff_left_s = max(0.0, (health.retry_after_ms or 0) / 1000 - time.time())
    asked_while_down = bed.homeserver.count(server_name=dead)
    bed.homeserver.set_server(
        dead, latency=workload.latency_s, max_concurrent=workload.max_concurrent
    )
    back = time.monotonic()
    outcome = bed.wait_converged(back, SOAK_TIMEOUT_S)
    check(outcome)
    users_of_dead = workload.users // workload.servers
    politeness_s = users_of_dead * workload.latency_s / workload.max_concurrent
    print(
        f"\ndead server: asked {asked_while_down} times in 60 s, {health.consecutive_failures}"
        f" failures, backoff left {backoff_left_s:.1f} s at its return, converged"
        f" {outcome.seconds:.1f} s after it"
    )
    # Down, it was asked by the runs in flight until the threshold, then by one probe
    # per backoff (10, 20, 40 s...), each fetch with one quick retry: not once per user.
    assert asked_while_down <= 2 * (bed.settings.destination_failure_threshold + 3 + 4)
    assert outcome.seconds <= backoff_left_s + politeness_s + 15
