"""1. Ingest: appservice transactions over HTTP against the machine's own limit.

The limit is measured in the same run: the same membership rows written by a plain
batched `INSERT ... ON CONFLICT` loop, 1,000 rows per commit, with the same driver
(psycopg 3). It runs once before and once after the HTTP ingest and the two are
averaged, so a burst of load from the other tenants of the machine hits both sides.

Two rates are measured from the first transaction sent:
- accepted: until the last transaction is answered 200 (the events are durable in the
  inbox; this is what holds up the homeserver, and what the target is about);
- applied: until the inbox is empty, i.e. one worker consuming only the `events` queue
  has applied every event (entries, memberships, pending fetches) in order.
Fetch workers are not running: the fetches this queues are what the convergence run
measures.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any

from bench.context import Context, percentile
from bench.events import ingest_mix, room_setup, transactions
from bench.infra import Database
from bench.population import LOCAL_SERVER, make_population
from directory.config import Settings

BASELINE_BATCH = 1_000
BASELINE_TABLE = "bench_baseline_members"
BASELINE_UPSERT = (
    f"INSERT INTO {BASELINE_TABLE} (room_id, user_id, membership, displayname, avatar_url)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (room_id, user_id) DO UPDATE SET"
    " membership = excluded.membership, displayname = excluded.displayname,"
    " avatar_url = excluded.avatar_url"
)


def baseline_insert(db: Database, rows: list[tuple[Any, ...]]) -> float:
    """Rows per second of the plain loop, on a table shaped like room_members."""
    with db.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {BASELINE_TABLE}")
        conn.execute(
            f"CREATE TABLE {BASELINE_TABLE} (room_id varchar(255), user_id varchar(255),"
            " membership varchar(16) NOT NULL, displayname text, avatar_url text,"
            " PRIMARY KEY (room_id, user_id))"
        )
        conn.execute(f"CREATE INDEX ON {BASELINE_TABLE} (user_id)")
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cur:
            for i in range(0, len(rows), BASELINE_BATCH):
                cur.executemany(BASELINE_UPSERT, rows[i : i + BASELINE_BATCH])
                conn.commit()
        elapsed = time.perf_counter() - started
        conn.execute(f"DROP TABLE {BASELINE_TABLE}")
        conn.commit()
    return len(rows) / elapsed


def run(ctx: Context, profile: bool = False) -> dict[str, Any]:
    sizes = ctx.sizes
    ctx.reset_state()
    population = make_population(sizes.ingest_users, sizes.servers, seed=11)
    mix = ingest_mix(
        sizes.ingest_events,
        population,
        sizes.ingest_rooms,
        locals_=max(10, sizes.ingest_rooms // 10),
    )
    bodies = transactions(mix.events, sizes.txn_events)
    rows = mix.member_rows()
    print(
        f"  ingest: {len(mix.events)} events in {len(bodies)} transactions; {len(rows)} member rows"
    )

    before = baseline_insert(ctx.db, rows)
    ctx.start_workers(1, concurrency=2, queues="events")
    with ctx.http() as client:
        # Opens the connection pools of every layer, on rooms the measurement never uses.
        warm = [
            e
            for i in range(5)
            for e in room_setup(f"!warmup{i}:{LOCAL_SERVER}", f"@local0000:{LOCAL_SERVER}", True)
        ]
        ctx.send_transactions(client, transactions(warm, sizes.txn_events), "warmup")
        wait_applied(ctx, timeout=60)
        started = time.perf_counter()
        latencies = ctx.send_transactions(client, bodies, "ingest")
        elapsed = time.perf_counter() - started
        wait_applied(ctx, timeout=max(120.0, elapsed * 20))
        applied_elapsed = time.perf_counter() - started
        # The same number of transactions of events the hooks ignore (parse, store in
        # the inbox, commit, answer): the HTTP path's own floor.
        floor_events = min(len(mix.events), 20_000)
        floor_bodies = transactions(_ignored_events(floor_events), sizes.txn_events)
        floor_started = time.perf_counter()
        ctx.send_transactions(client, floor_bodies, "floor")
        floor_rate = floor_events / (time.perf_counter() - floor_started)
        wait_applied(ctx, timeout=120)
    ctx.procs.stop_matching("worker")
    after = baseline_insert(ctx.db, rows)

    rate = len(mix.events) / elapsed
    limit = (before + after) / 2
    result: dict[str, Any] = {
        "events": len(mix.events),
        "transactions": len(bodies),
        "events_per_transaction": sizes.txn_events,
        "mix": dict(mix.kinds),
        "seconds": elapsed,
        "events_per_second": rate,
        "transaction_ms_p50": percentile(latencies, 50) * 1000,
        "transaction_ms_p99": percentile(latencies, 99) * 1000,
        "ignored_events_per_second": floor_rate,
        "baseline_rows": len(rows),
        "baseline_rows_per_second_before": before,
        "baseline_rows_per_second_after": after,
        "baseline_rows_per_second": limit,
        "ratio": rate / limit,
        "target": 0.5,
        "pass": rate / limit >= 0.5,
        "applied_seconds": applied_elapsed,
        "applied_events_per_second": len(mix.events) / applied_elapsed,
        "applied_ratio": len(mix.events) / applied_elapsed / limit,
        "batch_events": Settings.from_env().ingest_batch_events,
        "entries": ctx.scalar("SELECT count(*) FROM user_directory"),
        "pending_fetches": ctx.scalar("SELECT count(*) FROM pending_fetches"),
        "room_members": ctx.scalar("SELECT count(*) FROM room_members"),
    }
    if profile:
        result["profile_top"] = profile_hooks(ctx, bodies[: max(1, min(len(bodies), 200))])
    return result


def wait_applied(ctx: Context, timeout: float) -> None:
    """Until every accepted transaction has been applied (the inbox is empty)."""
    deadline = time.monotonic() + timeout
    while ctx.scalar("SELECT count(*) FROM event_inbox"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the inbox was not drained within {timeout:.0f} s")
        time.sleep(0.05)


def _ignored_events(count: int) -> list[dict[str, Any]]:
    """Room messages: parsed and skipped by the hooks, as big as member events."""
    return [
        {
            "type": "m.room.message",
            "sender": f"@someone{i % 97}:hs001.example",
            "room_id": f"!room{i % 2000:05d}:{LOCAL_SERVER}",
            "event_id": f"$floor{i:08d}",
            "origin_server_ts": 1_800_000_000_000,
            "content": {"msgtype": "m.text", "body": "hello " * 20},
            "unsigned": {"age": 120},
        }
        for i in range(count)
    ]


def profile_hooks(ctx: Context, bodies: list[bytes]) -> str:
    """Where the consumer's time goes: these transactions accepted, then applied in this
    process under cProfile (same code and database as a worker's), on a fresh schema."""
    import json

    from directory.ingest import accept_transaction, apply_accepted
    from tasks.resources import get_resources

    ctx.db.truncate_all()
    engine = get_resources().engine
    settings = get_resources().settings
    for body in bodies:
        accept_transaction(engine, json.loads(body)["events"])
    profiler = cProfile.Profile()
    started = time.perf_counter()
    batches = 0
    profiler.enable()
    while apply_accepted(engine, settings, lambda _outcome: None).transactions:
        batches += 1
    profiler.disable()
    elapsed = time.perf_counter() - started
    out = io.StringIO()
    out.write(
        f"{len(bodies)} transactions applied in {batches} batches in {elapsed:.2f} s"
        f" in-process ({elapsed / len(bodies) * 1000:.1f} ms per transaction)\n"
    )
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    out.write("\n-- the service's own functions (cumulative, so nested calls overlap):\n")
    stats.print_stats("/directory/", 30)
    out.write("\n-- everything:\n")
    stats.print_stats(25)
    return out.getvalue()
