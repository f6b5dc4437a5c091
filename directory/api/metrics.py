"""What /metrics exposes. Request counts and latencies are this process's own; every
figure about the directory's state, and the totals of work done by any process
(profile fetches and their durations, the inbox's apply delays, repairs, snapshots,
the bootstrap), is read from the database at each scrape, so it is the same whichever
server process answers, adds up every worker on every host, and survives restarts.
directory/telemetry.py names the database-backed metrics."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Connection, func, select

from directory import telemetry
from directory.models import user_directory
from directory.snapshots import PURPOSES
from directory.storage import bootstrap as bootstrap_store
from directory.storage import counters, destinations, inbox, pending
from directory.storage import rooms as room_store


@dataclass
class _Readings:
    """The database's figures as of the last scrape."""

    totals: dict[str, int] = field(default_factory=dict)
    bootstrap: bootstrap_store.Progress | None = None
    bootstrap_active: bool = False


class _DatabaseTotals(Collector):
    """Counters whose totals live in the database (storage.counters), and the
    bootstrap's progress, as read by Metrics.refresh."""

    def __init__(self, readings: _Readings) -> None:
        self.readings = readings

    def collect(self) -> Iterator[Metric]:
        totals = self.readings.totals
        yield from _work_totals(totals)

        progress = self.readings.bootstrap
        running = GaugeMetricFamily(
            "directory_bootstrap_running", "1 while a bootstrap run is unfinished"
        )
        running.add_metric([], 1 if self.readings.bootstrap_active else 0)
        yield running
        rooms = GaugeMetricFamily(
            "directory_bootstrap_rooms",
            "Rooms of the latest bootstrap run, by state",
            labels=["state"],
        )
        memberships = GaugeMetricFamily(
            "directory_bootstrap_memberships", "Memberships loaded by the latest bootstrap run"
        )
        rate = GaugeMetricFamily(
            "directory_bootstrap_memberships_per_second",
            "Memberships the latest bootstrap run loaded per second over the last minute",
        )
        if progress is not None:
            for state, value in (
                ("listed", progress.listed),
                ("waiting", progress.waiting),
                ("read", progress.read),
                ("loaded", progress.loaded),
                ("failed", progress.failed),
            ):
                rooms.add_metric([state], value)
            memberships.add_metric([], progress.memberships)
            rate.add_metric(
                [], progress.recent_memberships / (bootstrap_store.RATE_WINDOW_MS / 1000)
            )
        yield rooms
        yield memberships
        yield rate


def _work_totals(totals: dict[str, int]) -> Iterator[Metric]:
    """The counters and histograms workers add to (directory/telemetry.py names them),
    every label value shown from zero on."""
    repairs = CounterMetricFamily(
        telemetry.RECONCILE_REPAIRS,
        "Differences a scheduled room check found and repaired",
        labels=["kind"],
    )
    for kind in telemetry.REPAIR_KINDS:
        repairs.add_metric([kind], totals.get(telemetry.REPAIRS_PREFIX + kind, 0))
    yield repairs

    snapshots = CounterMetricFamily(
        telemetry.SNAPSHOTS,
        "Room snapshots applied or refused as stale, by why the room was read"
        " (backfill: our server joined the room)",
        labels=["purpose", "result"],
    )
    found = {
        tuple(name[len(telemetry.SNAPSHOTS_PREFIX) :].split(":", 1)): value
        for name, value in totals.items()
        if name.startswith(telemetry.SNAPSHOTS_PREFIX)
    }
    for purpose in PURPOSES:
        for result in telemetry.SNAPSHOT_RESULTS:
            found.setdefault((purpose, result), 0)
    for key, value in sorted(found.items()):
        if len(key) == 2:
            snapshots.add_metric(list(key), value)
    yield snapshots

    fetches = CounterMetricFamily(
        telemetry.FETCHES,
        "Profile fetches (quick retries included) by how they ended: ok, not_found,"
        " forbidden, timeout, 5xx, 429, invalid, other (a dropped connection, an"
        " unexpected status), homeserver (our own homeserver did not serve it)",
        labels=["outcome"],
    )
    for outcome in telemetry.FETCH_OUTCOMES:
        fetches.add_metric([outcome], totals.get(telemetry.FETCHES_PREFIX + outcome, 0))
    yield fetches

    fetch_seconds = HistogramMetricFamily(
        telemetry.FETCH_SECONDS, "Duration of a profile fetch (quick retries included)"
    )
    buckets, total = telemetry.histogram(
        totals, telemetry.FETCH_SECONDS_PREFIX, telemetry.FETCH_SECONDS_BUCKETS
    )
    fetch_seconds.add_metric([], buckets, total)
    yield fetch_seconds

    apply_delay = HistogramMetricFamily(
        telemetry.APPLY_DELAY_SECONDS,
        "From an inbox item's acceptance (a transaction, a room snapshot) to its application",
        labels=["kind"],
    )
    for kind in telemetry.APPLY_KINDS:
        buckets, total = telemetry.histogram(
            totals, f"{telemetry.APPLY_DELAY_PREFIX}{kind}:", telemetry.APPLY_DELAY_BUCKETS
        )
        apply_delay.add_metric([kind], buckets, total)
    yield apply_delay


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.transactions = Counter(
            "directory_transactions", "Appservice transactions", ["result"], registry=self.registry
        )
        self.events = Counter(
            "directory_events", "Events received", ["result"], registry=self.registry
        )
        self.searches = Counter(
            "directory_searches", "Search requests", ["status"], registry=self.registry
        )
        self.search_seconds = Histogram(
            "directory_search_seconds", "Search latency", registry=self.registry
        )
        self.entries = Gauge("directory_entries", "Directory entries", registry=self.registry)
        self.visible_rooms = Gauge(
            "directory_visible_rooms",
            "Rooms with a local member (whose members we know)",
            registry=self.registry,
        )
        self.inbox_events = Gauge(
            "directory_inbox_events",
            "Events accepted and not applied yet",
            registry=self.registry,
        )
        self.inbox_age = Gauge(
            "directory_inbox_oldest_age_seconds",
            "Age of the oldest transaction not applied yet (0 when none waits)",
            registry=self.registry,
        )
        self.pending = Gauge(
            "directory_pending_fetches",
            "Pending profile fetches",
            ["state"],
            registry=self.registry,
        )
        self.backed_off = Gauge(
            telemetry.DESTINATIONS_BACKED_OFF,
            "Remote servers waiting out a backoff after consecutive failures",
            registry=self.registry,
        )
        self._readings = _Readings()
        self.registry.register(_DatabaseTotals(self._readings))

    def refresh(self, conn: Connection, now: int) -> None:
        """Read the database's figures (in a worker thread: it blocks)."""
        self.entries.set(conn.scalar(select(func.count()).select_from(user_directory)))
        self.visible_rooms.set(room_store.count_visible(conn))
        summary = pending.summary(conn, now)
        backlog = inbox.backlog(conn)
        self.inbox_events.set(backlog.events)
        self.inbox_age.set(0 if backlog.oldest_ms is None else (now - backlog.oldest_ms) / 1000)
        self.pending.labels("due").set(summary.due)
        self.pending.labels("waiting").set(summary.waiting)
        self.pending.labels("given_up").set(summary.given_up)
        self.backed_off.set(destinations.count_backed_off(conn, now))
        self._readings.totals = counters.read(conn)
        run = bootstrap_store.latest_run(conn)
        self._readings.bootstrap_active = run is not None and run.finished_at_ms is None
        self._readings.bootstrap = (
            None if run is None else bootstrap_store.progress(conn, run.id, now)
        )
