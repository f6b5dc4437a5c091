"""5. Steady state: event-to-directory latency under a steady event rate, and the
worker's memory over many fetches.

Latency, with the default process layout (`python run.py`: the HTTP server, an events
worker, a fetch worker and beat, started with run.py's own commands): transactions of
100 events at a fixed pace (500 events/s = one every 200 ms),
each carrying first-sight joins (10), one global rename echoed into the user's rooms,
joins of known users to more rooms and leaves, against a 50 ms remote. For every
change that needs a fetch, the latency is the entry's fetched_at_ms (stamped by the
worker when it stored the public profile) minus the moment the transaction was sent;
a change superseded by a later one for the same user is not counted. The placeholder
itself is visible when the transaction's 200 arrives (committed first), so the
transaction round trip is reported too, and so is the layout's memory: the RSS of each
of its processes (a worker's pool children included), at the end and at its highest
during the stream. Target: p50 <= 250 ms and p99 <= 1 s.

Memory: one fresh worker fetches the whole population once (warm-up: imports, pools,
caches), its RSS is read, then every entry is queued again and again (what a refresh
of all profiles does) until the given number of fetches is reached, and RSS is read
again. The fake answers at once here (--rss-latency-ms), since the remote's latency
changes how long this takes, not what a fetch allocates.
"""

from __future__ import annotations

import random
import time
from typing import Any

from bench.context import Context, percentile
from bench.events import member_event, room_setup, transactions
from bench.infra import MachineCpu, cpu_seconds, tree_rss_bytes, wait_until
from bench.load import load_backlog, now_ms, requeue_all
from bench.population import LOCAL_SERVER, make_population, public_profile

STEADY_ROOMS = 200
INITIAL_USERS = 1_000
NEW_USERS_PER_TXN = 10
LEAVES_PER_TXN = 10
TRACKED_SQL = (
    "SELECT user_id, display_name, fetched_at_ms FROM user_directory WHERE user_id = ANY(%s)"
)
# Longest wait, after the stream stops, for the last changes to reach the directory.
DRAIN_SECONDS = 120.0
# Longest the memory run may take, whatever --rss-fetches asks.
RSS_MAX_SECONDS = 1800.0
# Users fetched round after round by the memory run.
RSS_POPULATION = 5_000


def run(ctx: Context) -> dict[str, Any]:
    result: dict[str, Any] = {"latency": _latency(ctx)}
    result["rss"] = _rss(ctx)
    return result


# Event -> public profile with the default layout, at 500 events/s and a 50 ms remote.
TARGET_P50_MS = 250.0
TARGET_P99_MS = 1000.0
# The benchmark's name for each process of run.py's layout (the "worker" prefix is what
# Context.reset_state stops between phases).
LAYOUT_NAMES = {
    "server": "server",
    "events worker": "worker-events",
    "fetch worker": "worker-fetch",
    "beat": "beat",
}
READY_MARKERS = {"worker-events": b" ready.", "worker-fetch": b" ready.", "beat": b"beat: Starting"}


def run_layout() -> list[tuple[str, tuple[str, ...]]]:
    import run

    return run.layout()


def start_layout(ctx: Context) -> None:
    """The processes `python run.py` (`make run`) starts, with its exact commands: the
    HTTP server (already running, started with the services), an events worker, a
    fetch worker with the default pool and concurrency, and beat."""
    assert ctx.procs
    import run

    for name, argv in run.layout(beat_schedule=str(ctx.logdir / "beat-schedule")):
        bench_name = LAYOUT_NAMES[name]
        if bench_name == "server":
            continue
        # --worker-pool reaches the fetch worker as its default (WORKER_POOL), as an
        # operator's setting would; WORKER_CONCURRENCY is the service environment's.
        ctx.procs.spawn(bench_name, list(argv), env={"WORKER_POOL": ctx.sizes.worker_pool})
    for bench_name, marker in READY_MARKERS.items():
        ctx.procs.wait_for_log(bench_name, marker)


def layout_rss_mb(ctx: Context) -> dict[str, float]:
    """RSS of each process of the layout, pool children included, in MB."""
    assert ctx.procs
    return {
        name: tree_rss_bytes(ctx.procs.pid(bench_name)) / 2**20
        for name, bench_name in LAYOUT_NAMES.items()
    }


def layout_cpu_seconds(ctx: Context) -> dict[str, float]:
    assert ctx.procs
    return {
        name: cpu_seconds(ctx.procs.pid(bench_name)) for name, bench_name in LAYOUT_NAMES.items()
    }


def _latency(ctx: Context) -> dict[str, Any]:
    assert ctx.procs and ctx.fake
    sizes = ctx.sizes
    ctx.reset_state()
    start_layout(ctx)
    rng = random.Random(3)
    per_txn = sizes.txn_events
    txns = max(1, int(sizes.steady_seconds * sizes.steady_rate / per_txn))
    population = make_population(INITIAL_USERS + txns * NEW_USERS_PER_TXN, sizes.servers, seed=21)
    order = population.users[:]
    rng.shuffle(order)
    rooms = [f"!steady{i:04d}:{LOCAL_SERVER}" for i in range(STEADY_ROOMS)]
    user_rooms: dict[str, list[str]] = {}
    versions: dict[str, int] = {}
    next_user = 0

    def join(user: str, room: str) -> dict[str, Any]:
        user_rooms.setdefault(user, []).append(room)
        p = public_profile(user, versions.get(user, 0))
        return member_event(room, user, "join", p["displayname"], p["avatar_url"])

    setup = [
        e
        for i, room in enumerate(rooms)
        for e in room_setup(room, f"@local{i % 20:04d}:{LOCAL_SERVER}", i % 3 == 0)
    ]
    for user in order[:INITIAL_USERS]:
        setup.append(join(user, rooms[rng.randrange(len(rooms))]))
    next_user = INITIAL_USERS
    with ctx.http() as client:
        ctx.send_transactions(client, transactions(setup, per_txn), "steady-setup")
        ctx.wait_quiet(timeout=300)
        ctx.fake.reset()

        tracked: dict[str, tuple[str, int]] = {}  # user -> (expected name, sent at ms)
        superseded = 0
        round_trips: list[float] = []
        interval = per_txn / sizes.steady_rate
        machine = MachineCpu()
        cpu_before = layout_cpu_seconds(ctx)
        rss_peak = layout_rss_mb(ctx)
        last_reading = time.monotonic()
        started = time.monotonic()
        for k in range(txns):
            events: list[dict[str, Any]] = []
            changes: list[tuple[str, str]] = []
            for user in order[next_user : next_user + NEW_USERS_PER_TXN]:
                events.append(join(user, rooms[rng.randrange(len(rooms))]))
                changes.append((user, public_profile(user)["displayname"]))
            next_user += NEW_USERS_PER_TXN
            # One global rename, echoed into every room of the user.
            known = order[: next_user - NEW_USERS_PER_TXN]
            renamed = known[rng.randrange(len(known))]
            old = public_profile(renamed, versions.get(renamed, 0))
            versions[renamed] = versions.get(renamed, 0) + 1
            new = public_profile(renamed, versions[renamed])
            for room in user_rooms[renamed]:
                events.append(
                    member_event(
                        room,
                        renamed,
                        "join",
                        new["displayname"],
                        new["avatar_url"],
                        {"membership": "join", **old},
                    )
                )
            changes.append((renamed, new["displayname"]))
            # Leaves of users in more than one room (their entries stay), and joins of
            # known users to further rooms, fill the transaction.
            for _ in range(LEAVES_PER_TXN):
                user = known[rng.randrange(len(known))]
                if len(user_rooms[user]) > 1 and user != renamed:
                    room = user_rooms[user].pop(rng.randrange(len(user_rooms[user])))
                    events.append(member_event(room, user, "leave"))
            for _ in range(per_txn * 10):
                if len(events) >= per_txn:
                    break
                user = known[rng.randrange(len(known))]
                room = rooms[rng.randrange(len(rooms))]
                if room not in user_rooms[user] and user != renamed:
                    events.append(join(user, room))
            ctx.fake.set_versions({renamed: versions[renamed]})
            # Keep the pace: transaction k leaves at k * interval (or at once if late).
            delay = started + k * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = now_ms()
            for user, name in changes:
                superseded += user in tracked
                tracked[user] = (name, sent)
            round_trips += ctx.send_transactions(
                client, transactions(events, per_txn), f"steady-{k}"
            )
            if time.monotonic() - last_reading >= 1.0:
                # Each process's highest reading during the stream.
                reading = layout_rss_mb(ctx)
                rss_peak = {name: max(mb, rss_peak[name]) for name, mb in reading.items()}
                last_reading = time.monotonic()
        stream_seconds = time.monotonic() - started
        cpu_busy = machine.busy()

    def latencies() -> list[float] | None:
        with ctx.db.connect(autocommit=True) as conn:
            rows = conn.execute(
                TRACKED_SQL,
                (list(tracked),),
            ).fetchall()
        found = []
        for user, name, fetched in rows:
            expected, sent = tracked[user]
            if name == expected and fetched is not None:
                found.append(max(0, fetched - sent))
        return found if len(found) == len(tracked) else None

    drained = True
    try:
        values = wait_until(latencies, DRAIN_SECONDS, 0.5, "every change to reach the directory")
    except TimeoutError:
        drained = False
        values = None
    measured: list[float] = values if isinstance(values, list) else []
    if not drained:
        with ctx.db.connect(autocommit=True) as conn:
            measured = [
                max(0, fetched - tracked[user][1])
                for user, name, fetched in conn.execute(
                    TRACKED_SQL,
                    (list(tracked),),
                )
                if name == tracked[user][0] and fetched is not None
            ]
    stats = ctx.fake.stats()
    rss_end = layout_rss_mb(ctx)
    cpu_after = layout_cpu_seconds(ctx)
    ctx.procs.stop_matching("worker")
    ctx.procs.stop_matching("beat")
    events_sent = txns * per_txn
    return {
        "events": events_sent,
        "events_per_second": events_sent / stream_seconds,
        "target_events_per_second": sizes.steady_rate,
        "latency_ms": sizes.latency_ms,
        "changes": len(tracked),
        "changes_superseded": superseded,
        "changes_reached": len(measured),
        "drained": drained,
        "p50_ms": percentile(measured, 50),
        "p90_ms": percentile(measured, 90),
        "p99_ms": percentile(measured, 99),
        "max_ms": max(measured, default=None),
        "transaction_ms_p50": percentile(round_trips, 50) * 1000,
        "transaction_ms_p99": percentile(round_trips, 99) * 1000,
        "profile_requests": stats["total_requests"],
        "rate_limited": stats["total_rate_limited"],
        "machine_cpu_busy": cpu_busy,
        # The default layout (run.py): each process's RSS with its pool children, at the
        # end (after the drain) and its highest reading during the stream, and the CPU
        # seconds it used from the stream's start to the end of the drain.
        "layout": [" ".join(argv) for _, argv in run_layout()],
        "layout_rss_mb": rss_end,
        "layout_rss_total_mb": sum(rss_end.values()),
        "layout_rss_peak_mb": rss_peak,
        "layout_rss_peak_total_mb": sum(rss_peak.values()),
        "layout_cpu_seconds": {name: cpu_after[name] - cpu_before[name] for name in cpu_after},
        "target_p50_ms": TARGET_P50_MS,
        "target_p99_ms": TARGET_P99_MS,
        "pass": drained
        and percentile(measured, 50) <= TARGET_P50_MS
        and percentile(measured, 99) <= TARGET_P99_MS,
    }


def _rss(ctx: Context) -> dict[str, Any]:
    assert ctx.procs and ctx.fake
    sizes = ctx.sizes
    ctx.reset_state()
    ctx.fake.configure(sizes.rss_latency_ms, sizes.max_concurrent)
    (name,) = ctx.start_workers(1)
    pid = ctx.procs.pid(name)
    # A population small enough that the warm-up is short; it is fetched again and
    # again, round after round.
    population = make_population(
        min(sizes.users, RSS_POPULATION, sizes.rss_fetches), sizes.servers, seed=1
    )
    from tasks.outbox import publish_due_work

    def drain(timeout: float) -> None:
        publish_due_work()
        wait_until(
            lambda: ctx.scalar("SELECT count(*) FROM pending_fetches") == 0,
            timeout,
            0.25,
            "fetches to drain",
        )

    with ctx.db.connect() as conn:
        load_backlog(conn, population.users)
        conn.commit()
    drain(RSS_MAX_SECONDS)
    warmup = ctx.fake.stats()["total_requests"]
    before = tree_rss_bytes(pid)
    samples = [(0, before / 2**20)]
    started = time.monotonic()
    fetched = 0
    budget_cut = False
    while fetched < sizes.rss_fetches:
        elapsed = time.monotonic() - started
        round_seconds = elapsed / max(1, len(samples) - 1)
        if fetched and (elapsed > RSS_MAX_SECONDS or ctx.time_left() < round_seconds + 5):
            # Another round would not end within the run's time budget.
            budget_cut = True
            break
        with ctx.db.connect() as conn:
            requeue_all(conn)
            conn.commit()
        drain(RSS_MAX_SECONDS)
        fetched = ctx.fake.stats()["total_requests"] - warmup
        samples.append((fetched, tree_rss_bytes(pid) / 2**20))
    elapsed = time.monotonic() - started
    after = tree_rss_bytes(pid)
    ctx.procs.stop(name)
    ctx.fake.configure(sizes.latency_ms, sizes.max_concurrent)
    growth = after / before - 1
    return {
        "warmup_fetches": warmup,
        "fetches": fetched,
        "requested_fetches": sizes.rss_fetches,
        "cut_by_time_budget": budget_cut,
        "seconds": elapsed,
        "fetches_per_second": fetched / elapsed if elapsed else None,
        "remote_latency_ms": sizes.rss_latency_ms,
        "before_mb": before / 2**20,
        "after_mb": after / 2**20,
        "growth": growth,
        "mb_per_100k_fetches": _slope(samples) * 100_000,
        "samples": samples,
        "target": 0.10,
        "pass": growth <= 0.10,
    }


def _slope(samples: list[tuple[int, float]]) -> float:
    """Least-squares MB per fetch over the readings: a leak shows as a steady slope."""
    if len(samples) >= 3:
        samples = samples[1:]  # the first round still fills caches and pools
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    var = sum((x - mean_x) ** 2 for x, _ in samples)
    return sum((x - mean_x) * (y - mean_y) for x, y in samples) / var if var else 0.0
