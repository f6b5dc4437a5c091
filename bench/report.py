"""Results: machine facts, the targets table (Markdown for the README), the chart."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

from bench.context import Context
from directory.config import PROJECT_ROOT, Settings


def _git_commit() -> str | None:
    # Read, not run: the harness never invokes git.
    head = PROJECT_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if not ref.startswith("ref: "):
            return ref
        name = ref[5:]
        path = PROJECT_ROOT / ".git" / name
        if path.exists():
            return path.read_text().strip()
        packed = (PROJECT_ROOT / ".git" / "packed-refs").read_text()
        match = re.search(rf"^([0-9a-f]{{40}}) {re.escape(name)}$", packed, re.M)
        return match.group(1) if match else None
    except OSError:
        return None


def machine_info(ctx: Context) -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(mem_kb / 2**20, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgresql": ctx.scalar("SHOW server_version"),
        "commit": _git_commit(),
    }


def effective_settings(ctx: Context) -> dict[str, Any]:
    """The service settings its processes run with (secrets left out)."""
    settings = Settings.from_env(ctx.env)
    values = dataclasses.asdict(settings)
    for secret in ("as_token", "hs_token", "admin_token"):
        values[secret] = "(set)"
    return values


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _pool(results: dict[str, Any], run: dict[str, Any]) -> str:
    per_worker = run.get("concurrency_per_worker")
    pool = results.get("sizes", {}).get("worker_pool", "")
    return f" x {per_worker} {pool}" if per_worker else ""


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: what was measured, against what, and whether it is met."""
    rows: list[dict[str, Any]] = []
    b = results.get("benchmarks", {})
    if "ingest" in b:
        i = b["ingest"]
        rows.append(
            {
                "name": "ingest events/s ÷ batched INSERT rows/s",
                "measured": f"{_fmt(i['events_per_second'], 0)} events/s"
                f" vs {_fmt(i['baseline_rows_per_second'], 0)} rows/s",
                "value": i["ratio"],
                "target": "≥ 0.5",
                "goal": ("min", 0.5),
                "pass": i["pass"],
            }
        )
        if "applied_events_per_second" in i:
            rows.append(
                {
                    "name": "applied events/s (inbox drained) ÷ batched INSERT rows/s",
                    "measured": f"{_fmt(i['applied_events_per_second'], 0)} events/s,"
                    f" batches of {_fmt(i.get('batch_events') or 0, 0)} events",
                    "value": i["applied_ratio"],
                    "target": "(reported)",
                    "pass": None,
                }
            )
    if "bootstrap" in b:
        bs = b["bootstrap"]
        load, live = bs["bootstrap"], bs["live"]
        failed = [name for name, ok in bs["checks"]["ok"].items() if not ok]
        rows.append(
            {
                "name": "bootstrap memberships/s ÷ live applied events/s",
                "measured": f"{_fmt(bs['memberships_per_second'], 0)} memberships/s"
                f" ({_fmt(bs['rooms'])} rooms x {bs['members_per_room']} in"
                f" {_fmt(load['seconds'], 1)} s) vs {_fmt(bs['live_events_per_second'], 0)}"
                f" events/s ({_fmt(live['events'])} joins)"
                + (f"; checks failed: {', '.join(failed)}" if failed else ""),
                "value": bs["ratio"],
                "target": "≥ 0.5",
                "goal": ("min", bs["target"]),
                "pass": bs["pass"],
            }
        )
        requests = load["homeserver_requests"]
        pages, reads = requests.get("admin_rooms", 0), requests.get("admin_state", 0)
        rows.append(
            {
                "name": "bootstrap: homeserver requests per room",
                "measured": f"{_fmt(requests['total'])} requests for {_fmt(bs['rooms'])} rooms"
                f" ({_fmt(pages)} list pages, {_fmt(reads)} state reads,"
                f" {_fmt(requests['total'] - pages - reads)} other)",
                "value": bs["requests_per_room"],
                "target": "≤ 3",
                "goal": ("max", bs["requests_target"]),
                "pass": bs["requests_pass"],
            }
        )
    if "dedup" in b:
        for case in b["dedup"]["cases"]:
            rows.append(
                {
                    "name": f"dedup: requests per change, {case['name']}",
                    "measured": f"{case['requests']} requests for {case['changes']} changes",
                    "value": case["requests_per_change"],
                    "target": "= 1.00",
                    "goal": ("exact", 1.0),
                    "pass": case["pass"],
                }
            )
        mismatch = b["dedup"].get("mismatch")
        if mismatch:
            rows.append(
                {
                    "name": f"dedup: requests, {mismatch['name']}",
                    "measured": f"{mismatch['requests']} requests for"
                    f" {_fmt(mismatch['echo_events'])} echoes",
                    "value": float(mismatch["requests"]),
                    "target": "≤ 2",
                    "goal": ("max", 2.0),
                    "pass": mismatch["pass"],
                }
            )
        reads = b["dedup"].get("room_reads")
        if reads:
            rows.append(
                {
                    "name": "room reads (backfill tasks) per room joined",
                    "measured": f"{_fmt(reads['reads'])} reads for"
                    f" {_fmt(reads['rooms_joined'])} rooms joined",
                    "value": reads["reads_per_room"],
                    "target": "= 1.00",
                    "goal": ("exact", 1.0),
                    "pass": reads["pass"],
                }
            )
    if "convergence" in b:
        c = b["convergence"]
        for r in c["runs"]:
            rows.append(
                {
                    "name": f"convergence, {r['workers']} worker(s)"
                    f"{_pool(results, r)} ÷ politeness bound",
                    "measured": f"{_fmt(r['seconds'], 1)} s vs"
                    f" {_fmt(c['politeness_bound_seconds'], 1)} s; {r['rate_limited']} x 429",
                    "value": r["bound_ratio"],
                    "target": "≤ 1.3, no 429",
                    "goal": ("max", 1.3),
                    "pass": r["pass_bound"],
                }
            )
        for r in c["runs"]:
            rows.append(
                {
                    "name": f"speed-up vs reference algorithm, {r['workers']} worker(s)",
                    "measured": f"{_fmt(c['reference_seconds'], 1)} s simulated"
                    f" vs {_fmt(r['seconds'], 1)} s",
                    "value": r["speedup_vs_reference"],
                    "target": "≥ 3",
                    "goal": ("min", 3.0),
                    "pass": r["pass_speedup"],
                }
            )
        if "scaling" in c:
            rows.append(
                {
                    "name": "convergence scaling, 1 → 2 workers",
                    "measured": "time(1) ÷ time(2)",
                    "value": c["scaling"],
                    "target": "(reported)",
                    "pass": None,
                }
            )
    if "search" in b:
        s = b["search"]
        levels = s["levels"]
        measured = "; ".join(
            f"{_fmt(lv['entries'], 0)}: p50 {_fmt(lv['p50_ms'], 1)}"
            f" / p99 {_fmt(lv['p99_ms'], 1)} ms"
            for lv in levels
        )
        rows.append(
            {
                "name": f"search p99 at {_fmt(levels[-1]['entries'])}"
                f" ÷ p99 at {_fmt(levels[0]['entries'])}",
                "measured": measured,
                "value": s["ratio"],
                "target": "≤ 2",
                "goal": ("max", 2.0),
                "pass": s.get("prefix_pass", s["pass"]),
            }
        )
        if "infix_ratio" in s:
            rows.append(
                {
                    "name": f"infix search p99 at {_fmt(levels[-1]['entries'])}"
                    f" ÷ p99 at {_fmt(levels[0]['entries'])}",
                    "measured": "; ".join(
                        f"{_fmt(lv['entries'], 0)}: p50 {_fmt(lv['infix']['p50_ms'], 1)}"
                        f" / p99 {_fmt(lv['infix']['p99_ms'], 1)} ms"
                        for lv in levels
                    ),
                    "value": s["infix_ratio"],
                    "target": "≤ 2",
                    "goal": ("max", 2.0),
                    "pass": s["infix_pass"],
                }
            )
    if "steady" in b:
        st = b["steady"]
        rss = st.get("rss")
        if rss:
            rows.append(
                {
                    "name": f"worker RSS growth over {_fmt(rss['fetches'])} fetches",
                    "measured": f"{_fmt(rss['before_mb'], 1)} → {_fmt(rss['after_mb'], 1)} MB"
                    f" ({_fmt(rss['mb_per_100k_fetches'], 2)} MB per 100k fetches)"
                    + (
                        f"; stopped by the time budget, {_fmt(rss['requested_fetches'])} asked"
                        if rss.get("cut_by_time_budget")
                        else ""
                    ),
                    "value": rss["growth"],
                    "target": "≤ 0.10",
                    "goal": ("max", 0.10),
                    "pass": rss["pass"],
                }
            )
        lat = st.get("latency")
        if lat and "target_p50_ms" in lat:
            p50, p99 = lat["p50_ms"], lat["p99_ms"]
            p50_target, p99_target = lat["target_p50_ms"], lat["target_p99_ms"]
            rows.append(
                {
                    "name": f"event → public profile at {_fmt(lat['events_per_second'], 0)}"
                    f" events/s, {_fmt(lat['latency_ms'], 0)} ms remote, default layout"
                    " (events worker + fetch worker)",
                    "measured": f"p50 {_fmt(p50, 0)} ms, p99 {_fmt(p99, 0)} ms"
                    f" ({_fmt(lat['changes'])} changes"
                    + ("" if lat["drained"] else "; not all reached the directory")
                    + ")",
                    # The worse of the two against its limit: ≤ 1 meets both.
                    "value": None
                    if math.isnan(p50) or math.isnan(p99)
                    else max(p50 / p50_target, p99 / p99_target),
                    "target": f"p50 ≤ {_fmt(p50_target, 0)} ms,"
                    f" p99 ≤ {_fmt(p99_target / 1000, 0)} s",
                    "goal": ("max", 1.0),
                    "pass": lat["pass"],
                }
            )
            rss = lat["layout_rss_mb"]
            rows.append(
                {
                    "name": "RSS of the default layout after that run",
                    "measured": f"{_fmt(lat['layout_rss_total_mb'], 0)} MB: "
                    + ", ".join(f"{name} {_fmt(mb, 0)}" for name, mb in rss.items())
                    + f" (highest during the stream: {_fmt(lat['layout_rss_peak_total_mb'], 0)}"
                    " MB)",
                    "value": None,
                    "target": "(reported)",
                    "pass": None,
                }
            )
        elif lat:
            rows.append(
                {
                    "name": f"event → public profile at {_fmt(lat['events_per_second'], 0)}"
                    f" events/s, {_fmt(lat['latency_ms'], 0)} ms remote",
                    "measured": f"p50 {_fmt(lat['p50_ms'], 0)} ms, p99 {_fmt(lat['p99_ms'], 0)} ms"
                    f" ({lat['changes']} changes)",
                    "value": None,
                    "target": "(reported)",
                    "pass": None,
                }
            )
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| measurement | measured | ratio | target | met |",
        "|---|---|---:|---|---|",
    ]
    for row in results.get("targets", []):
        met = "-" if row["pass"] is None else ("yes" if row["pass"] else "**no**")
        lines.append(
            f"| {row['name']} | {row['measured']} | {_fmt(row['value'])}"
            f" | {row['target']} | {met} |"
        )
    machine = results.get("machine", {})
    lines.append("")
    lines.append(
        f"{machine.get('cpus', '?')} CPUs ({machine.get('cpu_model', '?')}), PostgreSQL "
        f"{machine.get('postgresql', '?')}, Python {machine.get('python', '?')}; "
        f"{results.get('started_at', '?')}, {_fmt(results.get('duration_seconds'), 0)} s"
        + (" (--quick sizes)" if results.get("quick") else "")
    )
    for phase, error in results.get("errors", {}).items():
        what = "interrupted" if phase == "interrupted" else f"{phase} failed"
        lines.append(f"\n**{what}**: {error}")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from bench.plot import draw

    draw(plt, results, path)
    return True
