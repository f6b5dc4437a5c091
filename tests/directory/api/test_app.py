"""The HTTP API as a homeserver and clients see it: the appservice transaction contract
(auth, durable acceptance before the 200, in-order application, replays, bad input
losing nothing) and the Matrix search endpoint (auth through whoami, the spec's shape,
limits, rate limiting)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from directory.config import Settings
from directory.ingest import apply_accepted
from directory.storage import inbox
from tests.conftest import SERVER_NAME, with_settings
from tests.directory.api.conftest import RunningApi, serve
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.fake_homeserver import error as error_reply
from tests.support.services import PrivateRedis
from tests.support.state import entry_ids

ALICE = "@alice:remote.test"
BOB = f"@bob:{SERVER_NAME}"
EVE = f"@eve:{SERVER_NAME}"
HS = {"Authorization": "Bearer hs-secret"}


def put(api: RunningApi, txn: str, body: object, headers: dict | None = None, **kw):
    """PUT a transaction and wait for the stand-in worker to apply it."""
    with api.client() as client:
        response = client.put(
            f"/_matrix/app/v1/transactions/{txn}",
            json=body,
            headers=HS if headers is None else headers,
            **kw,
        )
    api.settle()
    return response


def inbox_backlog(engine: Engine) -> inbox.Backlog:
    with engine.connect() as conn:
        return inbox.backlog(conn)


def test_a_transaction_needs_the_hs_token(api: RunningApi, db: Engine) -> None:
    body = {"events": [member("!r:x", BOB)]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "hs-secret"}):
        response = put(api, "t1", body, headers)
        assert response.status_code == 403
        assert response.json()["errcode"] == "M_FORBIDDEN"
    assert entry_ids(db) == set()
    with api.client() as client:
        legacy = client.put("/transactions/t2?access_token=hs-secret", json=body)
    assert legacy.status_code == 200 and legacy.json() == {}
    api.settle()
    assert entry_ids(db) == {BOB}


def test_a_transaction_is_applied_once_accepted(api: RunningApi, db: Engine) -> None:
    response = put(api, "t1", {"events": [member("!r:x", BOB), member("!r:x", ALICE)]})
    assert response.status_code == 200 and response.json() == {}
    assert entry_ids(db) == {BOB, ALICE}
    assert api.published.outcomes[0].fetch_servers == {"remote.test": 1, SERVER_NAME: 1}
    assert inbox_backlog(db).transactions == 0


@pytest.fixture
def accepting_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    yield from serve(api_settings, db, homeserver, apply=False)


def test_a_transaction_is_durable_before_the_200_and_applied_in_order_later(
    accepting_api: RunningApi, db: Engine
) -> None:
    first = [member("!r:x", BOB), member("!r:x", ALICE)]
    assert put(accepting_api, "t1", {"events": first}).status_code == 200
    leave = [member("!r:x", ALICE, membership="leave")]
    assert put(accepting_api, "t2", {"events": leave}).status_code == 200
    # No worker here: the 200s mean the events are stored, not yet applied.
    backlog = inbox_backlog(db)
    assert (backlog.transactions, backlog.events) == (2, 3)
    assert entry_ids(db) == set()

    applied = apply_accepted(db, accepting_api.settings, accepting_api.published)
    # Both transactions in one batch, in the order they were accepted: Alice left.
    assert (applied.transactions, applied.more) == (2, False)
    assert entry_ids(db) == {BOB}
    assert inbox_backlog(db).transactions == 0


def test_a_replayed_transaction_is_answered_but_not_processed_again(
    api: RunningApi, db: Engine
) -> None:
    assert put(api, "t1", {"events": [member("!r:x", BOB)]}).status_code == 200
    # Same id, different content: it is a replay by definition; nothing of it applies.
    assert put(api, "t1", {"events": [member("!r:x", ALICE)]}).status_code == 200
    assert entry_ids(db) == {BOB}
    assert len(api.published.outcomes) == 1


def test_bad_bodies_get_matrix_errors(api: RunningApi, db: Engine) -> None:
    with api.client() as client:
        not_json = client.put("/_matrix/app/v1/transactions/t1", content=b"{oops", headers=HS)
    assert not_json.status_code == 400 and not_json.json()["errcode"] == "M_NOT_JSON"
    for body in ([1, 2], {"events": {"a": 1}}, "text"):
        response = put(api, "t2", body)
        assert response.status_code == 400 and response.json()["errcode"] == "M_BAD_JSON"
    # A NUL cannot be stored as a transaction id: refused, not a 500 retried forever.
    response = put(api, "t%00", {"events": [member("!r:x", EVE)]})
    assert response.status_code == 400 and response.json()["errcode"] == "M_INVALID_PARAM"
    # A rejected body did not consume its transaction id.
    assert put(api, "t2", {"events": [member("!r:x", BOB)]}).status_code == 200
    assert entry_ids(db) == {BOB}


def test_an_invalid_event_is_skipped_and_the_rest_processed(api: RunningApi, db: Engine) -> None:
    events = [
        member("!r:x", BOB),
        {"type": "m.room.member", "state_key": 7},
        "junk",
        member("!r:x", ALICE),
    ]
    assert put(api, "t1", {"events": events}).status_code == 200
    assert entry_ids(db) == {BOB, ALICE}
    assert api.published.outcomes[0].invalid == 2


@pytest.fixture
def small_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    yield from serve(with_settings(api_settings, max_transaction_bytes=2000), db, homeserver)


def test_an_oversized_transaction_is_refused(small_api: RunningApi, db: Engine) -> None:
    events = [member(f"!r{i}:x", BOB) for i in range(50)]
    response = put(small_api, "t1", {"events": events})
    assert response.status_code == 413 and response.json()["errcode"] == "M_TOO_LARGE"
    assert entry_ids(db) == set()


def search(api: RunningApi, body: object, token: str | None = "eve-token"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with api.client() as client:
        return client.post("/_matrix/client/v3/user_directory/search", json=body, headers=headers)


def test_search_needs_a_token_the_homeserver_knows(api: RunningApi) -> None:
    missing = search(api, {"search_term": "a"}, token=None)
    assert missing.status_code == 401 and missing.json()["errcode"] == "M_MISSING_TOKEN"
    unknown = search(api, {"search_term": "a"}, token="nope")
    assert unknown.status_code == 401 and unknown.json()["errcode"] == "M_UNKNOWN_TOKEN"


def test_search_answers_in_the_spec_shape_as_the_caller(api: RunningApi) -> None:
    api.homeserver.set_token("eve-token", EVE)
    api.homeserver.set_token("bob-token", BOB)
    events = [join_rules("!pub:x", "public"), member("!pub:x", EVE), member("!priv:x", BOB)]
    events += [member("!pub:x", f"@alice{i}:remote.test") for i in range(15)]
    events += [member("!priv:x", "@alicia:remote.test")]
    assert put(api, "t1", {"events": events}).status_code == 200

    response = search(api, {"search_term": "ALICE"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"results", "limited"}
    assert len(body["results"]) == 10 and body["limited"] is True  # default limit 10
    # Nobody's profile was fetched: placeholders, which have no display_name.
    assert all(set(hit) == {"user_id"} for hit in body["results"])
    assert "@alicia:remote.test" not in {hit["user_id"] for hit in body["results"]}

    everything = search(api, {"search_term": "alice", "limit": 1000}).json()
    assert len(everything["results"]) == 15 and everything["limited"] is False
    as_bob = search(api, {"search_term": "alicia"}, token="bob-token").json()
    assert [hit["user_id"] for hit in as_bob["results"]] == ["@alicia:remote.test"]
    assert api.homeserver.whoami_calls == 2  # one per token, then cached


def test_search_limit_is_clamped(api: RunningApi) -> None:
    api.homeserver.set_token("eve-token", EVE)
    events = [join_rules("!pub:x", "public"), member("!pub:x", EVE)]
    events += [member("!pub:x", f"@user{i}:remote.test") for i in range(60)]
    put(api, "t1", {"events": events})
    body = search(api, {"search_term": "user", "limit": 500}).json()
    assert len(body["results"]) == api.settings.search_max_limit == 50 and body["limited"]


def test_bad_search_bodies_get_matrix_errors(api: RunningApi) -> None:
    api.homeserver.set_token("eve-token", EVE)
    for body, code in (
        ({}, "M_MISSING_PARAM"),
        ({"search_term": 5}, "M_INVALID_PARAM"),
        ({"search_term": "a", "limit": "five"}, "M_INVALID_PARAM"),
        ([], "M_BAD_JSON"),
    ):
        response = search(api, body)
        assert response.status_code == 400 and response.json()["errcode"] == code, body
    with api.client() as client:
        raw = client.post(
            "/_matrix/client/v3/user_directory/search",
            content=b"nope",
            headers={"Authorization": "Bearer eve-token"},
        )
    assert raw.status_code == 400 and raw.json()["errcode"] == "M_NOT_JSON"


@pytest.fixture
def strict_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    limited = with_settings(api_settings, search_rate_burst=3, search_rate_per_second=0.5)
    yield from serve(limited, db, homeserver)


def test_search_is_rate_limited_per_user(strict_api: RunningApi) -> None:
    strict_api.homeserver.set_token("eve-token", EVE)
    strict_api.homeserver.set_token("bob-token", BOB)
    statuses = [search(strict_api, {"search_term": "x"}).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    refused = search(strict_api, {"search_term": "x"})
    assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["retry_after_ms"] > 0
    assert search(strict_api, {"search_term": "x"}, token="bob-token").status_code == 200


def test_health_and_metrics(api: RunningApi) -> None:
    put(api, "t1", {"events": [member("!r:x", BOB)]})
    with api.client() as client:
        health = client.get("/health")
        metrics = client.get("/metrics")
        unknown = client.get("/nothing/here")
    assert health.status_code == 200
    assert health.json() == {"homeserver": "ok", "database": "ok", "redis": "ok"}
    assert 'directory_transactions_total{result="accepted"} 1.0' in metrics.text
    assert 'directory_events_total{result="accepted"} 1.0' in metrics.text
    assert "directory_inbox_events 0.0" in metrics.text
    assert 'directory_pending_fetches{state="due"} 1.0' in metrics.text
    assert "directory_entries 1.0" in metrics.text
    assert "directory_visible_rooms 1.0" in metrics.text
    assert "directory_bootstrap_running 0.0" in metrics.text
    assert 'directory_reconcile_repairs_total{kind="members_added"} 0.0' in metrics.text
    assert unknown.status_code == 404 and unknown.json()["errcode"] == "M_UNRECOGNIZED"


def test_health_says_when_our_homeserver_refuses_our_token_or_is_down(
    api: RunningApi, homeserver: FakeHomeserver
) -> None:
    # Our own configuration or our homeserver: the operator must see it at once.
    homeserver.set_token(api.settings.as_token, "@someone-else:elsewhere")
    homeserver.script_api(
        "/_matrix/client/v3/account/whoami",
        error_reply(401, "M_UNKNOWN_TOKEN", "Unknown token"),
    )
    with api.client() as client:
        refused = client.get("/health")
    assert refused.status_code == 503
    assert refused.json()["homeserver"].startswith("error: the homeserver refuses AS_TOKEN")
    assert refused.json()["database"] == "ok"

    homeserver.stop()
    with api.client() as client:
        down = client.get("/health")
    assert down.status_code == 503
    assert down.json()["homeserver"] == "error: cannot reach HOMESERVER_URL (ConnectError)"


def test_health_is_right_on_the_first_probe_after_redis_comes_back(
    api: RunningApi, private_redis: PrivateRedis
) -> None:
    """The pooled connection died with Redis; it is replaced, not reported as an outage."""
    with api.client() as client:
        assert client.get("/health").status_code == 200
        private_redis.stop()
        down = client.get("/health")
        private_redis.start()
        back = client.get("/health")
    assert down.status_code == 503 and down.json()["redis"].startswith("error")
    assert back.status_code == 200, back.json()
