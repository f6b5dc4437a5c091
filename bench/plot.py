"""bench/results.png: one figure, four panels, drawn from results.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GREEN, RED, GREY = "#2e7d32", "#c62828", "#757575"


def draw(plt: Any, results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    b = results.get("benchmarks", {})
    _targets(axes[0][0], results.get("targets", []))
    _convergence(axes[0][1], b.get("convergence"))
    _search(axes[1][0], b.get("search"))
    _steady(axes[1][1], b.get("steady"))
    title = f"make bench — {results.get('started_at', '')}"
    if results.get("quick"):
        title += " (--quick sizes)"
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _empty(ax: Any, what: str) -> None:
    ax.text(
        0.5, 0.5, f"{what}: not run", ha="center", va="center", color=GREY, transform=ax.transAxes
    )
    ax.set_axis_off()


def _headroom(row: dict[str, Any]) -> float | None:
    """Measured against target so that >= 1 is met, whatever the target's direction."""
    value, goal = row.get("value"), row.get("goal")
    if value is None or not goal:
        return None
    kind, limit = goal
    if kind == "max":
        return limit / value if value > 0 else 100.0
    if kind == "min":
        return value / limit
    return 1.0 if row["pass"] else 0.5  # exact: met or not


def _targets(ax: Any, rows: list[dict[str, Any]]) -> None:
    scored = [(r["name"], _headroom(r), r["pass"]) for r in rows]
    scored = [s for s in scored if s[1] is not None]
    if not scored:
        _empty(ax, "targets")
        return
    names = [s[0] for s in scored][::-1]
    values = [max(min(s[1], 100.0), 0.01) for s in scored][::-1]
    colours = [GREEN if s[2] else RED for s in scored][::-1]
    ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(
        range(len(values)), [n if len(n) < 48 else n[:46] + "…" for n in names], fontsize=8
    )
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("headroom: measured vs target (≥ 1 is met; log scale)")
    ax.set_title("Targets")


def _convergence(ax: Any, c: dict[str, Any] | None) -> None:
    if not c:
        _empty(ax, "convergence")
        return
    users = c["users"]
    longest = 0.0
    for run in c["runs"]:
        xs = [0.0] + [t for t, _ in run["curve"]] + [run["seconds"]]
        ys = [0.0] + [n / users for _, n in run["curve"]] + [1.0]
        ax.plot(
            xs,
            ys,
            label=f"{run['workers']} worker(s): {run['seconds']:.0f} s,"
            f" {run['rate_limited']} x 429",
        )
        longest = max(longest, run["seconds"])
    horizon = max(longest, c["politeness_bound_seconds"]) * 2.5
    ref = [(t, n / users) for t, n in c["reference_curve"] if t <= horizon]
    ax.plot(
        [t for t, _ in ref],
        [f for _, f in ref],
        linestyle="--",
        color=GREY,
        label=f"reference algorithm (simulated): {c['reference_seconds']:.0f} s",
    )
    ax.axvline(
        c["politeness_bound_seconds"],
        color="black",
        linestyle=":",
        label=f"politeness bound {c['politeness_bound_seconds']:.0f} s",
    )
    ax.axvline(
        c["politeness_bound_seconds"] * 1.3,
        color=RED,
        linestyle=":",
        linewidth=0.8,
        label="1.3 x bound",
    )
    ax.set_xlim(0, horizon)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("seconds since the backlog was queued")
    ax.set_ylabel("share of entries holding their public profile")
    ax.set_title(
        f"Convergence: {users:,} users, {c['servers']} servers,"
        f" {c['latency_ms']:.0f} ms, ≤ {c['max_concurrent_per_server']} in flight",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower right")


def _search(ax: Any, s: dict[str, Any] | None) -> None:
    if not s:
        _empty(ax, "search")
        return
    levels = s["levels"]
    xs = [lv["entries"] for lv in levels]
    ax.plot(xs, [lv["p50_ms"] for lv in levels], marker="o", label="p50")
    ax.plot(xs, [lv["p99_ms"] for lv in levels], marker="o", label="p99")
    if all("infix" in lv for lv in levels):
        ax.plot(xs, [lv["infix"]["p99_ms"] for lv in levels], marker="s", label="infix p99")
    ax.axhline(
        2 * levels[0]["p99_ms"],
        color=RED,
        linestyle=":",
        label="target: 2 x p99 at the smallest size",
    )
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("directory entries")
    ax.set_ylabel("HTTP search latency (ms)")
    ax.set_title("Search latency vs directory size")
    ax.legend(fontsize=8)


def _steady(ax: Any, st: dict[str, Any] | None) -> None:
    rss = (st or {}).get("rss")
    if not rss:
        _empty(ax, "steady state")
        return
    xs = [n for n, _ in rss["samples"]]
    ax.plot(xs, [mb for _, mb in rss["samples"]], marker=".", label="worker RSS")
    ax.axhline(rss["before_mb"] * 1.1, color=RED, linestyle=":", label="+10% over the warm reading")
    ax.set_xlabel("fetches after warm-up")
    ax.set_ylabel("MB")
    ax.set_ylim(0, max(mb for _, mb in rss["samples"]) * 1.25)
    title = f"Worker memory: {rss['growth'] * 100:+.1f}% over {rss['fetches']:,} fetches"
    lat = st.get("latency") if st else None
    if lat:
        title += (
            f"\nevent → public profile at {lat['events_per_second']:.0f} ev/s:"
            f" p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms"
        )
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
