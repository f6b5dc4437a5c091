"""6. Bootstrap: loading a homeserver that already has rooms, against the live inbox.

The fake homeserver is given a generated homeserver (bench/roomset.py: by default
10,000 rooms x 50 joined members, 1-2 of them local, the rest remote users on many
servers, some with per-room nicknames) and answers Synapse's admin API for it. One
worker consuming only the `events` queue runs (the bootstrap's lister and loaders and
the inbox consumer all run there; no fetch worker, the fetches it queues are what the
convergence run measures), with the service's default pool.

(a) The baseline, in the same run: the same homeserver sent as events. Its rooms are
    set up first (local joins, join rule, history visibility; applied and their
    backfills done, untimed), then every remote member's join, shuffled across rooms,
    goes as appservice transactions of 100 events; the rate is from the first join
    sent until the inbox is empty: events applied per second.
(b) After a reset, `python -m directory bootstrap` as the operator runs it (ADMIN_TOKEN
    set, its progress going to bootstrap-cli.log), timed from its start until it exits
    0 with the run finished: memberships loaded per second = the memberships the run
    reports (bootstrap_rooms.members summed) / that time.

Target: (b) / (a) >= 0.5, and at most 3 requests to our homeserver per room (list
pages, state reads and anything else, profile fetches excluded: no fetch worker runs).
Every room must be loaded, room_members must hold every membership, and no per-room
nickname may reach an entry.
"""

from __future__ import annotations

import json
import random
import re
import resource
import time
from typing import Any

from bench.context import Context
from bench.events import member_event, room_setup
from bench.infra import MachineCpu, cpu_seconds, wait_until
from bench.ingest import wait_applied
from bench.roomset import ROOM_NICK_MARKER, GeneratedRooms, Room, RoomSpec
from directory.config import Settings

SEED = 23
CLI = "bootstrap-cli"
# How often the harness samples the run's progress and the inbox while it goes.
SAMPLE_SECONDS = 0.5
REQUESTS_TARGET = 3.0
RATIO_TARGET = 0.5
# A loader task's end in the worker's log (Celery's own line): how many rooms it read.
LOADER_DONE = re.compile(rb"tasks\.bootstrap\.load_rooms\[[^\]]*\] succeeded in [0-9.]+s: (\d+)")


def run(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    assert ctx.fake and ctx.procs
    spec = RoomSpec(
        rooms=sizes.bootstrap_rooms,
        members=sizes.bootstrap_members,
        users=sizes.bootstrap_users,
        servers=sizes.servers,
        seed=SEED,
    )
    homeserver = GeneratedRooms(spec)
    rooms = [homeserver.room(i) for i in range(spec.rooms)]
    memberships = spec.rooms * spec.members
    users = {m.user_id for room in rooms for m in room.members}
    print(
        f"  bootstrap: {spec.rooms:,} rooms x {spec.members} members ="
        f" {memberships:,} memberships of {len(users):,} users"
    )
    ctx.reset_state()
    ctx.fake.set_rooms(spec.to_json())

    live = measure_live(ctx, rooms, memberships)
    ctx.reset_state()
    loaded = measure_bootstrap(ctx, spec, memberships)
    checks = check_loaded(ctx, rooms, users, memberships, loaded)

    settings = Settings.from_env(ctx.env)
    ratio = loaded["memberships_per_second"] / live["events_per_second"]
    requests = loaded["homeserver_requests"]
    per_room = requests["total"] / spec.rooms
    checks_ok = all(checks["ok"].values())
    return {
        "rooms": spec.rooms,
        "members_per_room": spec.members,
        "memberships": memberships,
        "users": len(users),
        "remote_users": spec.users,
        "servers": spec.servers,
        "live": live,
        "bootstrap": loaded,
        "checks": checks,
        "checks_ok": checks_ok,
        "memberships_per_second": loaded["memberships_per_second"],
        "live_events_per_second": live["events_per_second"],
        "ratio": ratio,
        "target": RATIO_TARGET,
        "pass": ratio >= RATIO_TARGET and checks_ok,
        "requests_per_room": per_room,
        "requests_target": REQUESTS_TARGET,
        "requests_pass": per_room <= REQUESTS_TARGET,
        "batch_events": settings.ingest_batch_events,
        "bootstrap_concurrency": settings.bootstrap_concurrency,
        "worker_concurrency": sizes.worker_concurrency,
        "worker_pool": sizes.worker_pool,
    }


# -- (a) the live inbox ----------------------------------------------------------


def live_bodies(rooms: list[Room], txn_events: int) -> tuple[list[bytes], list[bytes], int]:
    """(setup transactions, join transactions, joins): every room set up by its local
    members, then every remote member's join, shuffled across rooms as live traffic
    arrives."""
    setup: list[dict[str, Any]] = []
    joins: list[tuple[str, Any]] = []
    for room in rooms:
        setup += room_setup(room.room_id, room.creator, room.public, room.world_readable)
        for member in room.members[1 : room.locals]:
            setup.append(member_event(room.room_id, member.user_id, "join", member.displayname))
        joins += [(room.room_id, member) for member in room.members[room.locals :]]
    random.Random(SEED).shuffle(joins)
    setup_bodies = [
        json.dumps({"events": setup[i : i + txn_events]}).encode()
        for i in range(0, len(setup), txn_events)
    ]
    join_bodies = []
    for i in range(0, len(joins), txn_events):
        events = [
            member_event(room_id, m.user_id, "join", m.displayname, m.avatar_url)
            for room_id, m in joins[i : i + txn_events]
        ]
        join_bodies.append(json.dumps({"events": events}).encode())
    return setup_bodies, join_bodies, len(joins)


def measure_live(ctx: Context, rooms: list[Room], memberships: int) -> dict[str, Any]:
    assert ctx.procs
    setup, bodies, joins = live_bodies(rooms, ctx.sizes.txn_events)
    (worker,) = ctx.start_workers(1, queues="events")
    with ctx.http() as client:
        # Untimed: the rooms become visible, and their backfills (403 from the fake:
        # the events describe the rooms) are done before the joins start.
        setup_started = time.perf_counter()
        ctx.send_transactions(client, setup, "boot-setup")
        wait_applied(ctx, timeout=120 + len(rooms) / 20)
        wait_until(
            lambda: not ctx.scalar("SELECT count(*) FROM rooms WHERE backfill_as IS NOT NULL"),
            120 + len(rooms) / 20,
            0.2,
            "the set-up rooms' backfills",
        )
        setup_seconds = time.perf_counter() - setup_started
        cpu = MachineCpu()
        worker_cpu = cpu_seconds(ctx.procs.pid(worker))
        started = time.perf_counter()
        latencies = ctx.send_transactions(client, bodies, "boot-live")
        accepted = time.perf_counter() - started
        wait_applied(ctx, timeout=max(120.0, accepted * 20))
        applied = time.perf_counter() - started
        busy = cpu.busy()
        worker_cpu = cpu_seconds(ctx.procs.pid(worker)) - worker_cpu
    room_members = ctx.scalar("SELECT count(*) FROM room_members")
    print(
        f"  bootstrap: live baseline {joins:,} joins applied in {applied:.1f} s"
        f" ({joins / applied:,.0f} events/s)"
    )
    return {
        "setup_transactions": len(setup),
        "setup_seconds": setup_seconds,
        "events": joins,
        "transactions": len(bodies),
        "accepted_seconds": accepted,
        "accepted_events_per_second": joins / accepted,
        "seconds": applied,
        "events_per_second": joins / applied,
        "transaction_ms_p50": sorted(latencies)[len(latencies) // 2] * 1000,
        "room_members": room_members,
        "room_members_ok": room_members == memberships,
        "worker_cpu_seconds": worker_cpu,
        "machine_busy": busy,
    }


# -- (b) the bootstrap -----------------------------------------------------------


def _sample(ctx: Context) -> tuple[int, int, int, int]:
    """(rooms loaded, memberships loaded, inbox rows, inbox events)."""
    with ctx.db.connect(autocommit=True) as conn:
        loaded, members = conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'loaded'),"
            " coalesce(sum(members) FILTER (WHERE state = 'loaded'), 0) FROM bootstrap_rooms"
        ).fetchone()
        rows, events = conn.execute(
            "SELECT count(*), coalesce(sum(events), 0) FROM event_inbox"
        ).fetchone()
    return int(loaded), int(members), int(rows), int(events)


def measure_bootstrap(ctx: Context, spec: RoomSpec, memberships: int) -> dict[str, Any]:
    assert ctx.procs and ctx.fake
    (worker,) = ctx.start_workers(1, queues="events")
    ctx.fake.reset()
    timeout = 120 + memberships / 500
    cpu = MachineCpu()
    worker_cpu = cpu_seconds(ctx.procs.pid(worker))
    fake_cpu = cpu_seconds(ctx.procs.pid("fake"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    log = ctx.procs.spawn(CLI, ["-m", "directory", "bootstrap"])
    process = ctx.procs.children[CLI]
    timeline: list[tuple[float, int, int, int, int]] = []
    try:
        while process.poll() is None:
            now = time.perf_counter() - started
            if now > timeout:
                raise TimeoutError(f"the bootstrap did not finish within {timeout:.0f} s ({log})")
            timeline.append((round(now, 2), *_sample(ctx)))
            time.sleep(SAMPLE_SECONDS)
        elapsed = time.perf_counter() - started
    finally:
        ctx.procs.stop(CLI)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = cpu.busy()
    worker_cpu = cpu_seconds(ctx.procs.pid(worker)) - worker_cpu
    fake_cpu = cpu_seconds(ctx.procs.pid("fake")) - fake_cpu
    output = log.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(
            f"python -m directory bootstrap exited {process.returncode}:\n{output[-2000:]}"
        )
    stats = ctx.fake.stats()
    with ctx.db.connect(autocommit=True) as conn:
        run_row = conn.execute(
            "SELECT id, started_at_ms, listed_at_ms, finished_at_ms, rooms_reported, last_error"
            " FROM bootstrap_runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
        states = {
            state: (int(count), int(members))
            for state, count, members in conn.execute(
                "SELECT state, count(*), coalesce(sum(members), 0) FROM bootstrap_rooms"
                " GROUP BY state"
            )
        }
        refused = dict(
            conn.execute(
                "SELECT name, value FROM counters WHERE name LIKE 'snapshots:%'"
            ).fetchall()
        )
    run_id, run_started, listed_at, finished_at, reported, last_error = run_row
    if finished_at is None:
        raise RuntimeError(f"the CLI exited 0 but run {run_id} is not finished")
    loaded_rooms, loaded_members = states.get("loaded", (0, 0))
    by_kind = dict(stats["homeserver_requests"])
    requests = {**by_kind, "total": int(stats["homeserver_requests_total"])}
    backlog = [events for *_, events in timeline]
    steps = _loader_steps(ctx, worker)
    print(
        f"  bootstrap: {loaded_members:,} memberships in {loaded_rooms:,} rooms loaded in"
        f" {elapsed:.1f} s ({loaded_members / elapsed:,.0f}/s); {requests['total']:,} requests"
        f" to the homeserver"
    )
    return {
        "run_id": run_id,
        "seconds": elapsed,
        "run_seconds": (finished_at - run_started) / 1000,
        "listing_seconds": None if listed_at is None else (listed_at - run_started) / 1000,
        "rooms_reported": reported,
        "last_error": last_error,
        "rooms_by_state": {state: count for state, (count, _) in states.items()},
        "rooms_loaded": loaded_rooms,
        "memberships": loaded_members,
        "memberships_per_second": loaded_members / elapsed,
        "rooms_per_second": loaded_rooms / elapsed,
        "homeserver_requests": requests,
        "profile_requests": stats["total_requests"],
        "snapshot_counters": refused,
        # Rooms read by each loader task that read any (a step lasts up to 30 s; four
        # loaders share the rooms evenly when claims take CLAIM_SIZE rooms each), and
        # how many loader tasks found nothing to read.
        "loader_steps": [n for n in steps if n],
        "idle_loader_tasks": sum(1 for n in steps if not n),
        "inbox_events_max": max(backlog, default=0),
        "inbox_events_mean": sum(backlog) / len(backlog) if backlog else 0,
        # (seconds since start, rooms loaded, memberships loaded, inbox rows, inbox events)
        "timeline": timeline,
        "cpu_seconds": {
            "worker": worker_cpu,
            "fake_homeserver": fake_cpu,
            "cli": (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime),
        },
        "machine_busy": busy,
        "cli_log": str(log),
        "cli_summary": output.strip().splitlines()[-1] if output.strip() else "",
    }


def _loader_steps(ctx: Context, worker: str) -> list[int]:
    """Rooms read by each bootstrap loader task of this worker, from its log."""
    assert ctx.procs
    with (ctx.logdir / f"{worker}.log").open("rb") as log:
        log.seek(ctx.procs.log_start.get(worker, 0))
        return [int(n) for n in LOADER_DONE.findall(log.read())]


def check_loaded(
    ctx: Context, rooms: list[Room], users: set[str], memberships: int, loaded: dict[str, Any]
) -> dict[str, Any]:
    """Cheap checks that the load is right: every room, every membership, publicity,
    every user's entry, and no per-room nickname in any entry."""
    public = sum(1 for room in rooms if room.public or room.world_readable)
    marker = f"%{ROOM_NICK_MARKER}%"
    found = {
        "rooms_loaded": loaded["rooms_loaded"],
        "memberships_reported": loaded["memberships"],
        "room_members": ctx.scalar("SELECT count(*) FROM room_members"),
        "visible_rooms": ctx.scalar("SELECT count(*) FROM rooms WHERE is_visible"),
        "public_rooms": ctx.scalar("SELECT count(*) FROM rooms WHERE is_public"),
        "entries": ctx.scalar("SELECT count(*) FROM user_directory"),
        "pending_fetches": ctx.scalar("SELECT count(*) FROM pending_fetches"),
        "per_room_names_shown": ctx.scalar(
            "SELECT count(*) FROM user_directory WHERE display_name ILIKE %s"
            " OR search_words ILIKE %s OR name_key ILIKE %s",
            marker,
            marker,
            marker,
        ),
    }
    expected = {
        "rooms_loaded": len(rooms),
        "memberships_reported": memberships,
        "room_members": memberships,
        "visible_rooms": len(rooms),
        "public_rooms": public,
        "entries": len(users),
        "per_room_names_shown": 0,
    }
    return {
        "found": found,
        "expected": expected,
        "ok": {name: found[name] == value for name, value in expected.items()},
    }
