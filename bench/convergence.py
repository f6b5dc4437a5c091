"""3. Convergence under politeness: a backlog of first-sight users on Zipf-sized fake
servers that answer after 50 ms and 429 beyond 3 concurrent requests.

The workers (and beat) are started first and idle; the backlog is then committed in one
transaction and announced the way reconciliation announces due work
(tasks.outbox.publish_due_work), so the clock starts with every worker ready. The end
is the last entry's fetched_at_ms, as the worker stamped it (no polling error).
"""

from __future__ import annotations

import time
from typing import Any

from bench.context import Context
from bench.infra import MachineCpu, cpu_seconds, tree_rss_bytes
from bench.load import converged, load_backlog, now_ms
from bench.population import make_population
from bench.reference import politeness_bound, simulate_reference, simulate_reference_with_wakeups

POLL_SECONDS = 0.5


def run(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    population = make_population(sizes.users, sizes.servers, seed=1)
    by_server = population.sizes
    latency = sizes.latency_ms / 1000
    bound = politeness_bound(by_server, latency, sizes.max_concurrent)
    reference = simulate_reference(by_server, latency)
    wakeups = simulate_reference_with_wakeups(by_server, latency)
    result: dict[str, Any] = {
        "users": len(population.users),
        "servers": len(by_server),
        "largest_server_users": max(by_server.values()),
        "largest_server_share": max(by_server.values()) / len(population.users),
        "latency_ms": sizes.latency_ms,
        "max_concurrent_per_server": sizes.max_concurrent,
        "worker_concurrency": sizes.worker_concurrency,
        "politeness_bound_seconds": bound,
        "reference_seconds": reference.seconds,
        "reference_with_wakeups_seconds": wakeups.seconds,
        "reference_curve": reference.curve(120),
        "runs": [],
    }
    for workers in sizes.workers:
        print(f"  convergence: {len(population.users)} users, {workers} worker(s)")
        result["runs"].append(_one_run(ctx, population, workers, bound))
    for run_ in result["runs"]:
        run_["bound_ratio"] = run_["seconds"] / bound
        run_["speedup_vs_reference"] = reference.seconds / run_["seconds"]
        run_["speedup_vs_reference_with_wakeups"] = wakeups.seconds / run_["seconds"]
        run_["pass_bound"] = (
            run_["bound_ratio"] <= 1.3 and run_["rate_limited"] == 0 and run_["complete"]
        )
        run_["pass_speedup"] = run_["speedup_vs_reference"] >= 3 and run_["complete"]
    runs = result["runs"]
    if len(runs) >= 2:
        result["scaling"] = runs[0]["seconds"] / runs[-1]["seconds"]
    return result


def _one_run(ctx: Context, population: Any, workers: int, bound: float) -> dict[str, Any]:
    assert ctx.procs and ctx.fake
    ctx.reset_state()
    # The same fetch capacity, split over the workers: every prefork child holds its own
    # database connections, and 2 x 24 of them would exhaust PostgreSQL's default 100.
    per_worker = max(1, ctx.sizes.worker_concurrency // workers)
    names = ctx.start_workers(workers, concurrency=per_worker)
    ctx.procs.start_beat()
    rss_start = {n: tree_rss_bytes(ctx.procs.pid(n)) for n in names}
    watched = [*names, "fake", "server"]
    cpu_start = {n: cpu_seconds(ctx.procs.pid(n)) for n in watched}
    machine = MachineCpu()
    with ctx.db.connect() as conn:
        load_backlog(conn, population.users)
        conn.commit()
    t0 = now_ms()
    from tasks.outbox import publish_due_work

    publish_due_work()
    total = len(population.users)
    curve: list[tuple[float, int]] = []
    deadline = time.monotonic() + max(120.0, bound * 8)
    complete = False
    while time.monotonic() < deadline:
        pending = ctx.scalar("SELECT count(*) FROM pending_fetches")
        fetched = ctx.scalar("SELECT count(*) FROM user_directory WHERE fetched_at_ms IS NOT NULL")
        curve.append(((now_ms() - t0) / 1000, fetched))
        if pending == 0 and fetched == total:
            complete = True
            break
        time.sleep(POLL_SECONDS)
    machine_busy = machine.busy()
    cpu = {n: cpu_seconds(ctx.procs.pid(n)) - cpu_start[n] for n in watched}
    last = ctx.scalar("SELECT max(fetched_at_ms) FROM user_directory") or now_ms()
    seconds = (last - t0) / 1000
    with ctx.db.connect() as conn:
        good, bad = converged(conn, population)
    stats = ctx.fake.stats()
    rss_end = {n: tree_rss_bytes(ctx.procs.pid(n)) for n in names}
    ctx.procs.stop_matching("worker")
    ctx.procs.stop_matching("beat")
    largest = max(population.by_server, key=lambda s: len(population.by_server[s]))
    first, last_request = stats["span"].get(largest, [0.0, 0.0])
    return {
        "workers": workers,
        "concurrency_per_worker": per_worker,
        "largest_server": {
            "users": len(population.by_server[largest]),
            "first_request_s": first - t0 / 1000,
            "last_request_s": last_request - t0 / 1000,
            "requests": stats["requests"].get(largest, 0),
            "max_in_flight": stats["max_in_flight"].get(largest, 0),
            "ms_per_request_per_slot": (last_request - first)
            * 1000
            * ctx.sizes.max_concurrent
            / max(1, stats["requests"].get(largest, 1)),
        },
        "complete": complete and bad == 0,
        "seconds": seconds,
        "entries_with_public_profile": good,
        "entries_wrong": bad,
        "profile_requests": stats["total_requests"],
        "duplicate_requests": stats["total_requests"] - stats["total_rate_limited"] - total,
        "rate_limited": stats["total_rate_limited"],
        "max_in_flight_per_server": max(stats["max_in_flight"].values(), default=0),
        "requests_per_second": total / seconds if seconds > 0 else None,
        "machine_cpu_busy": machine_busy,
        "cpu_seconds": cpu,
        "worker_rss_mb_start": {n: v / 2**20 for n, v in rss_start.items()},
        "worker_rss_mb_end": {n: v / 2**20 for n, v in rss_end.items()},
        "curve": curve,
    }


def profile_fetch(ctx: Context, users: int = 600) -> str:
    """Where one fetch's time goes: one destination's run (directory.fetching) in this
    process under cProfile, the fake answering at once, so what remains is our own
    cost per fetch: claims, locks, the HTTP client, the result's transaction."""
    import cProfile
    import io
    import pstats

    from directory.fetching import DestinationRun
    from tasks.resources import get_resources

    assert ctx.fake
    ctx.reset_state()
    ctx.fake.configure(0, 1000)
    population = make_population(users, 1, seed=5)
    with ctx.db.connect() as conn:
        load_backlog(conn, population.users)
        conn.commit()
    resources = get_resources()
    run_ = DestinationRun(resources.engine, resources.redis, resources.profiles, resources.settings)
    server = next(iter(population.by_server))
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    report = run_.run(server)
    profiler.disable()
    elapsed = time.perf_counter() - started
    ctx.fake.configure(ctx.sizes.latency_ms, ctx.sizes.max_concurrent)
    out = io.StringIO()
    out.write(
        f"{report.applied} fetches in {elapsed:.2f} s in-process, one slot,"
        " remote answering at once: "
        f"{elapsed / max(1, report.applied) * 1000:.2f} ms each\n"
    )
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    out.write("\n-- the service's own functions:\n")
    stats.print_stats("/directory/", 25)
    out.write("\n-- everything:\n")
    stats.print_stats(30)
    return out.getvalue()
