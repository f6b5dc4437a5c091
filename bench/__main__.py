"""`python -m bench [--quick] [--only ingest,bootstrap,dedup,convergence,search,steady] [sizes...]`

Starts its own database, Redis, fake homeserver and the service's processes, runs the
chosen measurements, writes bench/results.json and bench/results.png, prints a
Markdown table, and stops everything it started, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.context import Context, Sizes

BENCH_DIR = Path(__file__).resolve().parent
# Steady state last: its memory run is the only elastic part, and there it can use
# whatever the time budget has left.
PHASES = ("ingest", "bootstrap", "dedup", "convergence", "search", "steady")
# What each phase needs at default sizes on the 2-core machine, with some margin: the
# memory run leaves this much of the time budget to the phases after it.
RESERVE_SECONDS = {
    "ingest": 130,
    "bootstrap": 240,
    "dedup": 25,
    "convergence": 220,
    "steady": 60,
    "search": 80,
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, about a minute (smoke run)"
    )
    parser.add_argument(
        "--only", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results.json")
    parser.add_argument("--chart", type=Path, default=BENCH_DIR / "results.png")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the event hook and one fetch run in-process (cProfile)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the database (bench_<pid>) for inspection"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=800.0,
        help="seconds the whole run may take; the memory run (the only elastic part) stops"
        " early to stay within it (default 800; 0: no limit)",
    )
    sizes = parser.add_argument_group("sizes (defaults: the issue's; --quick shrinks them)")
    sizes.add_argument("--ingest-events", type=int)
    sizes.add_argument("--ingest-rooms", type=int)
    sizes.add_argument("--ingest-users", type=int)
    sizes.add_argument("--users", type=int, help="convergence: remote users")
    sizes.add_argument("--servers", type=int, help="remote servers (Zipf sizes, largest ~15%%)")
    sizes.add_argument("--latency-ms", type=float, help="each fake server's answer delay")
    sizes.add_argument(
        "--workers", type=_ints, help="worker processes per convergence run, e.g. 1,2"
    )
    sizes.add_argument("--worker-concurrency", type=int, help="threads per worker (-c)")
    sizes.add_argument("--worker-pool", choices=("threads", "prefork"), help="worker pool (-P)")
    sizes.add_argument("--dedup-rooms", type=int)
    sizes.add_argument("--dedup-users", type=int)
    sizes.add_argument("--dedup-user-rooms", type=int)
    sizes.add_argument(
        "--search-sizes", type=_ints, help="directory sizes, e.g. 10000,100000,1000000"
    )
    sizes.add_argument("--search-queries", type=int, help="timed searches per size")
    sizes.add_argument("--steady-seconds", type=float)
    sizes.add_argument("--steady-rate", type=float, help="events per second in the steady run")
    sizes.add_argument("--rss-fetches", type=int, help="fetches between the two RSS readings")
    sizes.add_argument("--bootstrap-rooms", type=int, help="rooms of the bootstrapped homeserver")
    sizes.add_argument("--bootstrap-members", type=int, help="joined members per room")
    sizes.add_argument(
        "--bootstrap-users", type=int, help="remote users the rooms' members are drawn from"
    )
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    return args


def build_sizes(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Sizes)
        if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(sizes, **overrides)


def _terminate(signum: int, _frame: object) -> None:
    # SIGTERM (e.g. from make or CI) unwinds like Ctrl-C, through every finally.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sizes = build_sizes(args)
    phases = [p for p in PHASES if p in args.only.split(",")]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logdir = BENCH_DIR / "out" / stamp
    logdir.mkdir(parents=True, exist_ok=True)
    # Ctrl-C raises KeyboardInterrupt even where the shell started us with SIGINT
    # ignored (a background job); SIGTERM and SIGHUP unwind the same way, unless
    # deliberately ignored (nohup).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _terminate)

    from bench import report

    ctx = Context(root=BENCH_DIR, logdir=logdir, sizes=sizes)
    if args.time_budget > 0:
        ctx.deadline = time.monotonic() + args.time_budget
    started = time.time()
    results: dict[str, Any] = {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "phases": phases,
        "sizes": dataclasses.asdict(sizes),
        "logs": str(logdir),
        "benchmarks": {},
        "phase_seconds": {},
        "errors": {},
    }
    print(f"bench: phases {', '.join(phases)}; logs in {logdir}")
    status = 0
    try:
        ctx.start_services()
        results["machine"] = report.machine_info(ctx)
        results["settings"] = report.effective_settings(ctx)
        for phase in phases:
            phase_started = time.time()
            ctx.reserve_seconds = sum(RESERVE_SECONDS[p] for p in phases[phases.index(phase) + 1 :])
            if args.quick:
                ctx.reserve_seconds /= 10
            print(f"bench: {phase}...", flush=True)
            try:
                results["benchmarks"][phase] = run_phase(ctx, phase, args)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                # One broken measurement must not cost the others: record it, go on.
                status = 1
                results["errors"][phase] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            results["phase_seconds"][phase] = round(time.time() - phase_started, 1)
            print(f"bench: {phase} took {time.time() - phase_started:.0f} s", flush=True)
    except KeyboardInterrupt as exc:
        status = 130
        results["errors"]["interrupted"] = str(exc) or "Ctrl-C"
        print("bench: interrupted; cleaning up", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        cleanup(ctx, keep=args.keep)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    results["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results["duration_seconds"] = time.time() - started
    results.setdefault("machine", {})["load_average_at_end"] = os.getloadavg()
    results["targets"] = report.targets(results)
    text = json.dumps(results, indent=2, default=str) + "\n"
    # The run's own copy always; an interrupted run does not replace the last results.
    (logdir / "results.json").write_text(text)
    output, chart_path = args.output, args.chart
    if status == 130:
        output, chart_path = logdir / "results.json", logdir / "results.png"
    else:
        output.write_text(text)
    chart = report.chart(results, chart_path)
    print()
    print(report.markdown(results))
    print(
        f"\nbench: wrote {output}"
        + (f" and {chart_path}" if chart else " (no chart: matplotlib missing)")
    )
    return status


def run_phase(ctx: Context, phase: str, args: argparse.Namespace) -> dict[str, Any]:
    if phase == "ingest":
        from bench import ingest

        return ingest.run(ctx, profile=args.profile)
    if phase == "bootstrap":
        from bench import bootstrap

        return bootstrap.run(ctx)
    if phase == "dedup":
        from bench import dedup

        return dedup.run(ctx)
    if phase == "convergence":
        from bench import convergence

        result = convergence.run(ctx)
        if args.profile:
            result["profile_fetch"] = convergence.profile_fetch(ctx)
        return result
    if phase == "steady":
        from bench import steady

        return steady.run(ctx)
    from bench import search

    return search.run(ctx)


def cleanup(ctx: Context, keep: bool) -> None:
    steps = [
        ("processes", lambda: ctx.procs and ctx.procs.stop_all()),
        ("fake client", lambda: ctx.fake and ctx.fake.close()),
        ("redis", lambda: ctx.redis and ctx.redis.stop()),
        ("database", lambda: None if keep else ctx.db.drop()),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            print(f"bench: cleanup of {what} failed: {exc}", file=sys.stderr)
    if keep and ctx.db.created:
        print(f"bench: kept database {ctx.db.name}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
