"""The names of what /metrics shows from the database, in one place.

Work done by workers is counted in the `counters` table (directory/storage/counters.py),
added to in the transaction that does the work, so /metrics (directory/api/metrics.py)
shows the same exact totals whichever server process answers, however many worker
processes on however many hosts did the work. This module names those counters, holds
the histograms' bucket bounds, and turns a piece of work into the amounts to add.

Counter names in the table are `<prefix><label values>`; a histogram is stored as one
counter per bucket it is not cumulative in (`...le=0.5` counts observations in
(0.25, 0.5]), plus its sum in microseconds (the table holds integers); /metrics
makes the buckets cumulative and derives the count.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from directory.profile_client import FetchResult, Outcome

# -- metric names, as Prometheus sees them ----------------------------------------------
FETCHES = "directory_fetches"  # counter: _total{outcome}
FETCH_SECONDS = "directory_fetch_seconds"  # histogram
APPLY_DELAY_SECONDS = "directory_apply_delay_seconds"  # histogram{kind}
DESTINATIONS_BACKED_OFF = "directory_destinations_backed_off"  # gauge
SNAPSHOTS = "directory_snapshots"  # counter: _total{purpose,result}
RECONCILE_REPAIRS = "directory_reconcile_repairs"  # counter: _total{kind}

# -- counter names in the `counters` table ----------------------------------------------
FETCHES_PREFIX = "fetches:"
FETCH_SECONDS_PREFIX = "fetch_seconds:"
APPLY_DELAY_PREFIX = "apply_delay_seconds:"
# Written by directory/snapshots.py (re-exported there).
REPAIRS_PREFIX = "reconcile_repairs:"
SNAPSHOTS_PREFIX = "snapshots:"
REPAIR_KINDS = ("members_added", "members_removed", "join_rule", "history_visibility")
SNAPSHOT_RESULTS = ("applied", "refused")

# A histogram's counters after its prefix (and label values): one per bucket, its sum.
BUCKET = "le="
SUM_US = "sum_us"
INF = float("inf")

# One profile fetch (its quick retries included), by how it ended. A TRANSIENT
# failure is split into a timeout, an HTTP 5xx from the remote (worded by our
# homeserver), and anything else (a dropped connection, an unexpected status).
OK, NOT_FOUND, FORBIDDEN = "ok", "not_found", "forbidden"
TIMEOUT, SERVER_ERROR, RATE_LIMITED = "timeout", "5xx", "429"
INVALID, OTHER, HOMESERVER = "invalid", "other", "homeserver"
FETCH_OUTCOMES = (
    OK,
    NOT_FOUND,
    FORBIDDEN,
    TIMEOUT,
    SERVER_ERROR,
    RATE_LIMITED,
    INVALID,
    OTHER,
    HOMESERVER,
)
# Bucket upper bounds (seconds); +Inf is implied.
FETCH_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From a transaction's acceptance to its application: milliseconds when the workers
# keep up, minutes when a backlog is drained.
APPLY_DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
# The inbox items whose delay is measured (storage.inbox's kinds).
APPLY_KINDS = ("events", "snapshot")

_DIRECT = {
    Outcome.OK: OK,
    Outcome.NOT_FOUND: NOT_FOUND,
    Outcome.FORBIDDEN: FORBIDDEN,
    Outcome.RATE_LIMITED: RATE_LIMITED,
    Outcome.INVALID: INVALID,
    Outcome.HOMESERVER: HOMESERVER,
}
# How profile_client words a TRANSIENT result that ran out of time: a read timeout,
# or a body that did not arrive within the attempt's deadline.
_TIMEOUT_ERRORS = ("timeout:", "body not complete within")


def fetch_outcome(result: FetchResult) -> str:
    """The class a fetch is counted under in directory_fetches_total."""
    direct = _DIRECT.get(result.outcome)
    if direct is not None:
        return direct
    if result.status is not None and result.status >= 500:
        return SERVER_ERROR
    if result.error is not None and result.error.startswith(_TIMEOUT_ERRORS):
        return TIMEOUT
    return OTHER


def bucket_label(bound: float) -> str:
    """A bucket's `le` as Prometheus writes it (0.5, 1.0, +Inf)."""
    return "+Inf" if bound == INF else repr(float(bound))


def observe(amounts: Counter[str], prefix: str, bounds: Sequence[float], seconds: float) -> None:
    """Add one observation of a histogram to `amounts` (counter name -> amount)."""
    seconds = max(0.0, seconds)
    index = bisect.bisect_left(bounds, seconds)
    bound = bounds[index] if index < len(bounds) else INF
    amounts[f"{prefix}{BUCKET}{bucket_label(bound)}"] += 1
    amounts[prefix + SUM_US] += round(seconds * 1_000_000)


def count_fetch(amounts: Counter[str], result: FetchResult, seconds: float) -> None:
    """Add one fetch (its outcome and its duration) to `amounts`."""
    amounts[FETCHES_PREFIX + fetch_outcome(result)] += 1
    observe(amounts, FETCH_SECONDS_PREFIX, FETCH_SECONDS_BUCKETS, seconds)


def apply_delays(items: Iterable[tuple[str, int]], now_ms: int) -> Counter[str]:
    """The amounts for inbox items (kind, received_at_ms) applied at `now_ms`. The
    acceptance was timed by the server's clock and the application by the worker's,
    so a clock behind counts as no delay rather than a negative one."""
    amounts: Counter[str] = Counter()
    for kind, received_at_ms in items:
        if kind in APPLY_KINDS:
            seconds = (now_ms - received_at_ms) / 1000
            observe(amounts, f"{APPLY_DELAY_PREFIX}{kind}:", APPLY_DELAY_BUCKETS, seconds)
    return amounts


def histogram(
    totals: Mapping[str, int], prefix: str, bounds: Sequence[float]
) -> tuple[list[tuple[str, float]], float]:
    """A stored histogram as Prometheus wants it: cumulative buckets, and the sum."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound in (*bounds, INF):
        label = bucket_label(bound)
        running += totals.get(f"{prefix}{BUCKET}{label}", 0)
        buckets.append((label, running))
    return buckets, totals.get(prefix + SUM_US, 0) / 1_000_000
