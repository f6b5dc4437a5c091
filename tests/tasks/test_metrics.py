"""/metrics adds up the work of every worker process: two real workers fetch
concurrently, with every way a fetch can end scripted, and the server's /metrics (a
real HTTP app on the same database) shows exactly what both did together."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from directory.config import Settings
from tasks.outbox import wake_inbox_consumer
from tests.conftest import APPSERVICE_SENDER, SERVER_NAME, with_settings
from tests.directory.api.conftest import RunningApi, serve
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
from tests.support.processes import ProcessGroup, wait_until
from tests.tasks.conftest import wait_for_no_pending

ROOM = "!metrics:remote.test"
BOB = f"@bob:{SERVER_NAME}"
HS = {"Authorization": "Bearer hs-secret"}
# The second worker's appservice token: the fake homeserver records who asked.
WORKER2_TOKEN = "as-worker2"
# Every way a fetch can end, each a user of a server of its own: the scripted first
# answer, and the outcome it is counted under (then the user's profile: "ok").
SCRIPTED = {
    "@gone:x-notfound.test": (None, "not_found"),
    "@shy:x-forbidden.test": (FORBIDDEN, "forbidden"),
    "@gw:x-5xx.test": (BAD_GATEWAY, "5xx"),
    # The read timeout is 1 s (the `settings` fixture).
    "@slow:x-timeout.test": (Hang(2.5), "timeout"),
    "@broken:x-invalid.test": (Raw(b'{"displayname": '), "invalid"),
    "@busy:x-429.test": (
        Reply(
            429,
            {"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests"},
            (("Retry-After", "1"),),
        ),
        "429",
    ),
    "@refused:x-homeserver.test": (
        error(401, "M_UNKNOWN_TOKEN", "Unknown token"),
        "homeserver",
    ),
}
# Plain users on several servers, so both workers' threads have runs to take.
PLAIN = [f"@user{i}:s{i % 6}.test" for i in range(48)]


@pytest.fixture
def api(
    pipeline_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    # Accepts transactions and serves /metrics; the worker processes apply the inbox.
    settings = with_settings(pipeline_settings, search_rate_burst=1000)
    yield from serve(settings, db, homeserver, apply=False)


def scrape(api: RunningApi) -> tuple[str, dict[str, dict[tuple, float]]]:
    with api.client() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return response.text, samples


def test_metrics_add_up_the_work_of_two_workers(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver, api: RunningApi
) -> None:
    homeserver.set_token(WORKER2_TOKEN, APPSERVICE_SENDER)
    homeserver.set_profile(BOB, "Bob")
    for user in PLAIN:
        homeserver.set_profile(user, user[1:].partition(":")[0].title())
    for user, (first, _) in SCRIPTED.items():
        if first is not None:
            homeserver.set_profile(user, "Scripted")
            homeserver.script(user, first)
        homeserver.set_server(user.partition(":")[2], latency=0.05)
    for server in {user.partition(":")[2] for user in PLAIN}:
        homeserver.set_server(server, latency=0.05)
    # A worker fetches (and applies the inbox) with only the application's own settings.
    processes.env.update(DESTINATION_FAILURE_THRESHOLD="10", FETCH_BATCH_SIZE="4")
    processes.start_worker("worker1")
    processes.env.update(AS_TOKEN=WORKER2_TOKEN)
    processes.start_worker("worker2")

    # In through the appservice API, as the homeserver sends them; a worker applies.
    users = [BOB, *PLAIN, *SCRIPTED]
    transactions = 0
    with api.client() as client:
        for start in range(0, len(users), 10):
            events = [member(ROOM, user) for user in users[start : start + 10]]
            answer = client.put(
                f"/_matrix/app/v1/transactions/m{start}", json={"events": events}, headers=HS
            )
            assert answer.status_code == 200
            transactions += 1
            wake_inbox_consumer()
        # Searches are this server process's own: one of each status.
        token = {"Authorization": "Bearer as-secret"}
        search = "/_matrix/client/v3/user_directory/search"
        assert client.post(search, json={"search_term": "bob"}, headers=token).status_code == 200
        assert client.post(search, json={"search_term": 7}, headers=token).status_code == 400
        assert client.post(search, json={"search_term": "bob"}).status_code == 401

    wait_until(
        lambda: {r.user_id for r in homeserver.requests} >= set(users),
        60,
        what="every user to be fetched",
    )
    wait_for_no_pending(db, timeout=60)
    text, samples = scrape(api)

    requests = homeserver.requests
    by_worker = Counter(r.authorization for r in requests)
    # Both workers fetched, concurrently.
    assert by_worker["Bearer as-secret"] > 0 and by_worker[f"Bearer {WORKER2_TOKEN}"] > 0, by_worker
    # The scripted first answers, then a profile for everyone whose first answer was
    # a failure (an answer, 404 or 403, is final).
    expected = Counter(outcome for _, outcome in SCRIPTED.values())
    expected["ok"] += len(users) - expected["not_found"] - expected["forbidden"]
    fetches = {
        dict(labels)["outcome"]: value
        for labels, value in samples["directory_fetches_total"].items()
    }
    assert fetches == {
        outcome: float(expected[outcome])
        for outcome in (
            "ok",
            "not_found",
            "forbidden",
            "timeout",
            "5xx",
            "429",
            "invalid",
            "other",
            "homeserver",
        )
    }
    # One request per fetch (no quick retries in these settings): every one counted once.
    assert len(requests) == sum(expected.values())
    assert samples["directory_fetch_seconds_count"][()] == len(requests)
    buckets = {
        dict(labels)["le"]: value
        for labels, value in samples["directory_fetch_seconds_bucket"].items()
    }
    assert buckets["+Inf"] == len(requests)
    # The timed-out fetch waited out the 1 s read timeout; the others took ~50 ms.
    assert buckets["0.05"] <= buckets["0.25"] <= buckets["1.0"] <= len(requests) - 1
    assert buckets["0.25"] >= len(requests) // 2
    assert 1.0 < samples["directory_fetch_seconds_sum"][()] < 1.0 + 0.5 * len(requests)

    # Every inbox item applied once, with its delay: the transactions, and the room's
    # backfill snapshot if its read went through.
    snapshots = sum(samples["directory_snapshots_total"].values())
    delays = samples["directory_apply_delay_seconds_count"]
    assert delays[(("kind", "events"),)] == transactions
    assert delays[(("kind", "snapshot"),)] == snapshots
    assert samples["directory_destinations_backed_off"][()] == 0
    searches = {
        dict(labels)["status"]: value
        for labels, value in samples["directory_searches_total"].items()
    }
    assert searches == {"200": 1.0, "400": 1.0, "401": 1.0}

    shown = [
        line
        for line in text.splitlines()
        if line.startswith(
            (
                "directory_fetches_total",
                "directory_fetch_seconds",
                "directory_apply_delay_seconds_count",
                "directory_apply_delay_seconds_sum",
                "directory_destinations_backed_off",
                "directory_searches_total",
                "directory_snapshots_total",
            )
        )
    ]
    split = ", ".join(f"{n} by {who.removeprefix('Bearer ')}" for who, n in by_worker.items())
    print("\n".join([f"requests: {split}", "/metrics after both workers:", *shown]))
