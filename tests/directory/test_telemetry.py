"""What /metrics counts from the database (directory/telemetry.py): each fetch under the
class of its end, histograms stored per bucket and shown cumulative, totals added to
concurrently kept exact, the apply delay of every inbox item, destinations backed off."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from sqlalchemy import Engine, insert

from directory import telemetry
from directory.api.metrics import Metrics
from directory.clock import now_ms
from directory.config import Settings
from directory.ingest import accept_transaction, apply_accepted
from directory.models import destinations, event_inbox
from directory.profile_client import FetchResult, Outcome, ProfileClient
from directory.storage import counters
from tests.conftest import SERVER_NAME, with_settings
from tests.support.events import member
from tests.support.fake_homeserver import (
    BAD_GATEWAY,
    FORBIDDEN,
    FakeHomeserver,
    Hang,
    Raw,
    Reply,
    error,
)

ALICE = "@alice:remote.test"
BOB = f"@bob:{SERVER_NAME}"


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (FetchResult(Outcome.OK), "ok"),
        (FetchResult(Outcome.NOT_FOUND, status=404), "not_found"),
        (FetchResult(Outcome.FORBIDDEN, status=403), "forbidden"),
        (FetchResult(Outcome.RATE_LIMITED, status=429), "429"),
        (FetchResult(Outcome.INVALID, error="body is not valid JSON", status=200), "invalid"),
        (FetchResult(Outcome.HOMESERVER, error="HTTP 401", status=401), "homeserver"),
        (FetchResult(Outcome.TRANSIENT, error="HTTP 502 M_UNKNOWN", status=502), "5xx"),
        (FetchResult(Outcome.TRANSIENT, error="timeout: TimeoutError"), "timeout"),
        (
            FetchResult(Outcome.TRANSIENT, error="body not complete within 2 s", status=200),
            "timeout",
        ),
        (FetchResult(Outcome.TRANSIENT, error="RemoteDisconnected: closed"), "other"),
        (FetchResult(Outcome.TRANSIENT, error="HTTP 400 M_UNKNOWN", status=400), "other"),
    ],
)
def test_each_fetch_counts_under_the_class_of_its_end(result: FetchResult, expected: str) -> None:
    assert telemetry.fetch_outcome(result) == expected


@pytest.fixture
def profile_client(settings: Settings, homeserver: FakeHomeserver) -> Iterator[ProfileClient]:
    client = ProfileClient(
        with_settings(settings, homeserver_url=homeserver.url, fetch_read_timeout_seconds=0.5)
    )
    yield client
    client.close()


def test_what_the_client_answers_is_classed_by_its_status_and_error(
    profile_client: ProfileClient, homeserver: FakeHomeserver
) -> None:
    homeserver.set_profile(ALICE, "Alice")
    homeserver.script(
        ALICE,
        BAD_GATEWAY,
        Hang(1.5),
        Raw(b"[1"),
        FORBIDDEN,
        Reply(429, {"errcode": "M_LIMIT_EXCEEDED"}, (("Retry-After", "1"),)),
        error(401, "M_UNKNOWN_TOKEN", "no"),
        error(400, "M_UNKNOWN", "an unexpected status"),
        Reply(502, None),
    )
    classes = [telemetry.fetch_outcome(profile_client.fetch(ALICE)) for _ in range(9)]
    assert classes == [
        "5xx",
        "timeout",
        "invalid",
        "forbidden",
        "429",
        "homeserver",
        "other",
        # A bare 5xx is our homeserver's proxy, not the remote.
        "homeserver",
        "ok",
    ]


def test_a_histogram_is_stored_per_bucket_and_shown_cumulative() -> None:
    amounts: Counter[str] = Counter()
    for seconds in (0.01, 0.05, 0.051, 0.3, 31.0, -1.0):
        telemetry.observe(amounts, "h:", (0.05, 0.1, 0.5), seconds)
    assert amounts == {
        "h:le=0.05": 3,  # an observation on a bound is in its bucket; a negative one is 0
        "h:le=0.1": 1,
        "h:le=0.5": 1,
        "h:le=+Inf": 1,
        "h:sum_us": 10_000 + 50_000 + 51_000 + 300_000 + 31_000_000,
    }
    buckets, total = telemetry.histogram(amounts, "h:", (0.05, 0.1, 0.5))
    assert buckets == [("0.05", 3), ("0.1", 4), ("0.5", 5), ("+Inf", 6)]
    assert total == pytest.approx(31.411)


def test_sharded_totals_add_up_and_one_statement_adds_many(db: Engine) -> None:
    with db.begin() as conn:
        for _ in range(40):
            counters.add(conn, {"fetches:ok": 2, "fetches:timeout": 1}, sharded=True)
        counters.add(conn, {"fetches:ok": 5, "snapshots:backfill:applied": 1, "zero": 0})
    with db.connect() as conn:
        assert counters.read(conn) == {
            "fetches:ok": 85,
            "fetches:timeout": 40,
            "snapshots:backfill:applied": 1,
        }
        assert counters.read(conn, "fetches:") == {"fetches:ok": 85, "fetches:timeout": 40}


def scrape(engine: Engine) -> str:
    metrics = Metrics()
    with engine.connect() as conn:
        metrics.refresh(conn, now_ms())
    return generate_latest(metrics.registry).decode()


def test_every_applied_inbox_item_counts_its_delay_since_acceptance(
    db: Engine, settings: Settings
) -> None:
    accept_transaction(db, [member("!r:x", BOB)], "t1")
    with db.begin() as conn:
        # Accepted 40 s ago, and one by a server whose clock is ahead of ours.
        conn.execute(
            insert(event_inbox).values(
                received_at_ms=now_ms() - 40_000, events=0, payload=b"", kind="events"
            )
        )
        conn.execute(
            insert(event_inbox).values(
                received_at_ms=now_ms() + 60_000, events=0, payload=b"", kind="events"
            )
        )
    while apply_accepted(db, settings, lambda _outcome: None).more:
        pass
    text = scrape(db)
    assert 'directory_apply_delay_seconds_count{kind="events"} 3.0' in text
    assert 'directory_apply_delay_seconds_bucket{kind="events",le="30.0"} 2.0' in text
    assert 'directory_apply_delay_seconds_bucket{kind="events",le="60.0"} 3.0' in text
    assert 'directory_apply_delay_seconds_count{kind="snapshot"} 0.0' in text


def test_destinations_backed_off_are_those_waiting_now(db: Engine) -> None:
    now = now_ms()
    with db.begin() as conn:
        for name, retry_after in (
            ("a", now + 60_000),
            ("b", now + 1_000),
            ("c", now - 1),
            ("d", None),
        ):
            conn.execute(
                insert(destinations).values(
                    server_name=name, consecutive_failures=3, retry_after_ms=retry_after
                )
            )
    text = scrape(db)
    assert "directory_destinations_backed_off 2.0" in text
    # Every class and every snapshot purpose is shown from zero on.
    assert 'directory_fetches_total{outcome="5xx"} 0.0' in text
    assert 'directory_snapshots_total{purpose="backfill",result="applied"} 0.0' in text
    assert "directory_fetch_seconds_count 0.0" in text
