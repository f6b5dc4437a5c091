"""The search contract, part "who may search" and the request's options, over real HTTP
against the real database, Redis and a fake homeserver answering whoami on a real
socket: guests refused, tokens that are no tokens refused without asking the
homeserver, unverified requests limited per address before whoami, logged-out tokens
failing within TOKEN_CACHE_SECONDS whatever order whoami's answers arrive in, `limit`
read as Synapse reads it, DIRECTORY_ENABLED, placeholders without display_name, and
database failures answered as Matrix JSON."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, event, text, update

from directory.config import Settings
from directory.db import is_sqlite, make_engine
from directory.models import user_directory
from directory.text import entry_keys
from tests.conftest import SERVER_NAME, with_settings
from tests.directory.api.conftest import RunningApi, serve
from tests.directory.api.test_app import put
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import WHOAMI_PATH, FakeHomeserver, Hang, Reply
from tests.support.fake_homeserver import error as error_reply

SEARCH = "/_matrix/client/v3/user_directory/search"
EVE = f"@eve:{SERVER_NAME}"
GUEST = f"@123:{SERVER_NAME}"
UNKNOWN = error_reply(401, "M_UNKNOWN_TOKEN", "Unknown token")


def whoami_requests(homeserver: FakeHomeserver) -> int:
    return homeserver.api_requests.count(WHOAMI_PATH)


def post(
    api: RunningApi, body: object = None, token: str | None = "eve-token", **kw: object
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with api.client() as client:
        if body is None:
            body = {"search_term": "user"}
        return client.post(SEARCH, json=body, headers=headers, **kw)  # type: ignore[arg-type]


def serve_with(
    api_settings: Settings, db: Engine, homeserver: FakeHomeserver, **changes: object
) -> Iterator[RunningApi]:
    yield from serve(with_settings(api_settings, **changes), db, homeserver)


# -- who may search ---------------------------------------------------------------------


def test_a_guest_may_not_search_and_the_answer_is_cached_with_the_user(api: RunningApi) -> None:
    api.homeserver.script_api(
        WHOAMI_PATH, Reply(200, {"user_id": GUEST, "is_guest": True, "device_id": "D"})
    )
    for _ in range(2):
        response = post(api, token="guest-token")
        assert response.status_code == 403, response.text
        assert response.json()["errcode"] == "M_GUEST_ACCESS_FORBIDDEN"
    assert whoami_requests(api.homeserver) == 1  # the second answer came from the cache
    # A real user's whoami says is_guest false: searching is fine.
    api.homeserver.set_token("eve-token", EVE)
    assert post(api).status_code == 200


def test_tokens_that_cannot_be_tokens_are_refused_without_asking_the_homeserver(
    api: RunningApi,
) -> None:
    api.homeserver.set_token("eve-token", EVE)
    with api.client() as client:
        answers = [
            # Non-ASCII (UTF-8 bytes) in the header: httpx could not even send it on.
            client.post(
                SEARCH,
                json={"search_term": "a"},
                headers={"Authorization": "Bearer t\xc3\xa9st".encode("latin-1")},
            ),
            client.post(SEARCH + "?access_token=t%C3%A9st", json={"search_term": "a"}),
            client.post(SEARCH + "?access_token=a%00b", json={"search_term": "a"}),
            client.post(SEARCH + "?access_token=a%0Db%0Ac", json={"search_term": "a"}),
            client.post(SEARCH + "?access_token=%FF%FE", json={"search_term": "a"}),
            client.post(
                SEARCH,
                json={"search_term": "a"},
                headers={"Authorization": "Bearer " + "x" * 10_000},
            ),
        ]
        missing = [
            client.post(SEARCH + "?access_token=", json={"search_term": "a"}),
            client.post(SEARCH, json={"search_term": "a"}, headers={"Authorization": "Bearer"}),
        ]
    for response in answers:
        assert response.status_code == 401, response.text
        assert response.json()["errcode"] == "M_UNKNOWN_TOKEN"
    for response in missing:
        assert response.status_code == 401 and response.json()["errcode"] == "M_MISSING_TOKEN"
    assert whoami_requests(api.homeserver) == 0
    assert post(api).status_code == 200


@pytest.fixture
def strict_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    # Three unverified requests per address, then (practically) never again.
    yield from serve_with(
        api_settings,
        db,
        homeserver,
        search_unverified_rate_burst=3,
        search_unverified_rate_per_second=0.01,
    )


def test_unverified_requests_are_limited_per_address_before_whoami(
    strict_api: RunningApi,
) -> None:
    homeserver = strict_api.homeserver
    homeserver.set_token("eve-token", EVE)
    homeserver.set_token("bob-token", f"@bob:{SERVER_NAME}")
    # Eve's token, verified before the spray: the cache answers for it, no charge.
    assert post(strict_api).status_code == 200
    # Bob's is verified during it, and gives its charge back.
    assert post(strict_api, token="bob-token").status_code == 200
    sprayed = [post(strict_api, token=secrets.token_hex(16)) for _ in range(10)]
    statuses = [response.status_code for response in sprayed]
    assert statuses == [401] * 3 + [429] * 7, statuses
    refused = sprayed[-1]
    assert refused.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["retry_after_ms"] > 0
    # The homeserver saw two verifications and the burst, not the spray.
    assert whoami_requests(homeserver) == 2 + 3
    # No token at all, a malformed one: charged too (and refused as over the limit).
    assert post(strict_api, token=None).status_code == 429
    with strict_api.client() as client:
        malformed = client.post(SEARCH + "?access_token=%01", json={"search_term": "a"})
    assert malformed.status_code == 429
    # Users whose tokens are cached still search.
    assert post(strict_api).status_code == 200
    assert post(strict_api, token="bob-token").status_code == 200


def test_missing_tokens_are_limited_per_address_too(strict_api: RunningApi) -> None:
    statuses = [post(strict_api, token=None).status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    assert whoami_requests(strict_api.homeserver) == 0


@pytest.fixture
def short_cache_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    yield from serve_with(api_settings, db, homeserver, token_cache_seconds=1.0)


def test_a_logged_out_token_stops_working_within_the_cache_time(
    short_cache_api: RunningApi,
) -> None:
    homeserver = short_cache_api.homeserver
    homeserver.set_token("eve-token", EVE)
    assert post(short_cache_api).status_code == 200
    # Eve logs out: from now on the homeserver rejects the token.
    homeserver.script_api(WHOAMI_PATH, *[UNKNOWN] * 50)
    logged_out = time.monotonic()
    # Still trusted from the cache for a moment (what TOKEN_CACHE_SECONDS is for)...
    assert post(short_cache_api).status_code == 200
    while (response := post(short_cache_api)).status_code == 200:
        assert time.monotonic() - logged_out < 1.5, "the logged-out token still works"
        time.sleep(0.05)
    # ...and refused within TOKEN_CACHE_SECONDS of the logout.
    assert response.status_code == 401 and response.json()["errcode"] == "M_UNKNOWN_TOKEN"
    assert time.monotonic() - logged_out <= 1.0 + 0.3


def search_in_thread(api: RunningApi) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(post(api)), daemon=True)
    thread.start()
    return thread, answers


@pytest.fixture
def remembering_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    # Rejections remembered long enough to see which answer the cache kept.
    yield from serve_with(api_settings, db, homeserver, token_failure_cache_seconds=30.0)


def test_a_slow_valid_answer_never_undoes_a_newer_rejection(remembering_api: RunningApi) -> None:
    homeserver = remembering_api.homeserver
    # The first whoami was answered "valid" before Eve logged out, but the answer is
    # slow to arrive; meanwhile a second request is told the token is unknown.
    homeserver.script_api(WHOAMI_PATH, Hang(1.5, then=Reply(200, {"user_id": EVE})))
    slow, slow_answer = search_in_thread(remembering_api)
    deadline = time.monotonic() + 5
    while whoami_requests(homeserver) < 1:
        assert time.monotonic() < deadline, "the first whoami never arrived"
        time.sleep(0.01)
    newer = post(remembering_api)
    assert newer.status_code == 401
    slow.join(timeout=10)
    # The slow request is answered with its own verdict...
    assert slow_answer and slow_answer[0].status_code == 200
    # ...but the cache keeps the newer rejection: the token does not work again.
    later = post(remembering_api)
    assert later.status_code == 401 and later.json()["errcode"] == "M_UNKNOWN_TOKEN"
    assert whoami_requests(homeserver) == 2  # the rejection came from the cache


def test_a_slow_answer_is_trusted_from_when_its_request_started(
    short_cache_api: RunningApi,
) -> None:
    homeserver = short_cache_api.homeserver
    # "Valid", arriving 1.2 s after the request started: with TOKEN_CACHE_SECONDS=1 it
    # is already stale when it lands, so the next search asks again (and Eve has
    # logged out by then).
    homeserver.script_api(WHOAMI_PATH, Hang(1.2, then=Reply(200, {"user_id": EVE})))
    assert post(short_cache_api).status_code == 200
    assert post(short_cache_api).status_code == 401
    assert whoami_requests(homeserver) == 2


# -- the request's options --------------------------------------------------------------


@pytest.fixture
def populated(api: RunningApi) -> RunningApi:
    """Eve in a public room with 60 remote users @user0..59."""
    api.homeserver.set_token("eve-token", EVE)
    events = [join_rules("!pub:x", "public"), member("!pub:x", EVE)]
    events += [member("!pub:x", f"@user{i}:remote.test") for i in range(60)]
    assert put(api, "t1", {"events": events}).status_code == 200
    return api


def test_limit_is_read_as_synapse_reads_it(populated: RunningApi) -> None:
    accepted = {
        "10": 10,
        10.0: 10,
        10.9: 10,
        " 7 ": 7,
        "+3": 3,
        3: 3,
        -1: 0,
        "-5": 0,
        500: 50,
        2**70: 50,
    }
    for limit, expected in accepted.items():
        response = post(populated, {"search_term": "user", "limit": limit})
        assert response.status_code == 200, (limit, response.text)
        body = response.json()
        assert len(body["results"]) == expected, limit
        assert body["limited"] is True, limit
    default = post(populated, {"search_term": "user"}).json()
    assert len(default["results"]) == 10
    for limit in ("abc", "1.5", "", None, True, False, [], {}, [10]):
        response = post(populated, {"search_term": "user", "limit": limit})
        assert response.status_code == 400, (limit, response.text)
        assert response.json()["errcode"] == "M_INVALID_PARAM", limit
    # Not expressible with json=: a number beyond a double, NaN, Infinity.
    headers = {"Authorization": "Bearer eve-token", "Content-Type": "application/json"}
    with populated.client() as client:
        huge = client.post(SEARCH, content=b'{"search_term":"u","limit":1e309}', headers=headers)
        nan = client.post(SEARCH, content=b'{"search_term":"u","limit":NaN}', headers=headers)
        inf = client.post(SEARCH, content=b'{"search_term":"u","limit":-Infinity}', headers=headers)
        big = client.post(SEARCH, content=b'{"search_term":"u","limit":' + b"9" * 400 + b"}")
    assert huge.status_code == 400 and huge.json()["errcode"] == "M_INVALID_PARAM"
    for response in (nan, inf):
        assert response.status_code == 400 and response.json()["errcode"] == "M_NOT_JSON"
    assert big.status_code == 401  # no token: checked before the body


def test_search_term_is_required_and_a_string(populated: RunningApi) -> None:
    for body, errcode in (
        ({}, "M_MISSING_PARAM"),
        ({"limit": 5}, "M_MISSING_PARAM"),
        ({"search_term": None}, "M_INVALID_PARAM"),
        ({"search_term": 5}, "M_INVALID_PARAM"),
        ({"search_term": ["user"]}, "M_INVALID_PARAM"),
        ({"search_term": {"a": 1}}, "M_INVALID_PARAM"),
    ):
        response = post(populated, body)
        assert response.status_code == 400 and response.json()["errcode"] == errcode, body
    # Control characters separate words; they never make a 500.
    with populated.client() as client:
        found = client.post(
            SEARCH,
            content=b'{"search_term": "user1\\u0000\\ud800\\u200f", "limit": 50}',
            headers={"Authorization": "Bearer eve-token"},
        ).json()
    assert {hit["user_id"] for hit in found["results"]} >= {"@user1:remote.test"}


def test_limit_zero_still_says_whether_there_is_more(populated: RunningApi) -> None:
    some = post(populated, {"search_term": "user", "limit": 0}).json()
    assert some == {"results": [], "limited": True}
    none = post(populated, {"search_term": "nobody", "limit": 0}).json()
    assert none == {"results": [], "limited": False}


@pytest.fixture
def disabled_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    yield from serve_with(api_settings, db, homeserver, directory_enabled=False)


def test_a_disabled_directory_answers_nothing_after_auth(disabled_api: RunningApi) -> None:
    disabled_api.homeserver.set_token("eve-token", EVE)
    events = [join_rules("!pub:x", "public"), member("!pub:x", EVE)]
    events += [member("!pub:x", "@user1:remote.test")]
    assert put(disabled_api, "t1", {"events": events}).status_code == 200
    assert post(disabled_api, token=None).status_code == 401
    assert post(disabled_api, token="nope").status_code == 401
    empty = {"results": [], "limited": False}
    assert post(disabled_api, {"search_term": "user"}).json() == empty
    # As Synapse: the body is not even read.
    assert post(disabled_api, {"search_term": 5, "limit": "x"}).json() == empty


def test_a_placeholder_has_no_display_name_and_a_profile_has_one(populated: RunningApi) -> None:
    alice = "@user7:remote.test"
    with populated.engine.begin() as conn:
        conn.execute(
            update(user_directory)
            .where(user_directory.c.user_id == alice)
            .values(
                display_name="Seven",
                avatar_url="mxc://remote.test/seven",
                fetched_at_ms=1,
                **entry_keys(alice, "Seven"),
            )
        )
    results = post(populated, {"search_term": "user7"}).json()["results"]
    assert results == [
        {"user_id": alice, "display_name": "Seven", "avatar_url": "mxc://remote.test/seven"}
    ]
    placeholder = post(populated, {"search_term": "user8"}).json()["results"]
    assert placeholder == [{"user_id": "@user8:remote.test"}]


# -- database failures ------------------------------------------------------------------


def search_counts(api: RunningApi) -> dict[str, float]:
    with api.client() as client:
        text_ = client.get("/metrics").text
    return {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text_)
        for sample in family.samples
        if sample.name == "directory_searches_total"
    }


@pytest.fixture
def timeout_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    # A search pool that gives up on a lock after 300 ms, as a busy database or a
    # pathological term would have it: PostgreSQL cancels the statement
    # (statement_timeout: QueryCanceled), SQLite says "database is locked".
    if is_sqlite(db):
        search_engine = make_engine(db.url.render_as_string(hide_password=False))
        event.listen(
            search_engine,
            "connect",
            lambda dbapi, _record: dbapi.execute("PRAGMA busy_timeout=300"),
        )
    else:
        search_engine = create_engine(
            db.url, pool_size=1, connect_args={"options": "-c statement_timeout=300"}
        )
    yield from serve(api_settings, db, homeserver, search_engine=search_engine)
    search_engine.dispose()


def test_a_database_timeout_is_a_503_in_matrix_json(timeout_api: RunningApi) -> None:
    timeout_api.homeserver.set_token("eve-token", EVE)
    events = [join_rules("!pub:x", "public"), member("!pub:x", EVE)]
    assert put(timeout_api, "t1", {"events": events}).status_code == 200
    with timeout_api.engine.connect() as conn, conn.begin():
        # Holds every reader of the directory off until the transaction ends (SQLite:
        # the write lock every transaction of ours takes at BEGIN).
        if not is_sqlite(conn.engine):
            conn.execute(text("LOCK TABLE user_directory IN ACCESS EXCLUSIVE MODE"))
        response = post(timeout_api, {"search_term": "eve"}, timeout=60)
    assert response.status_code == 503, response.text
    assert response.json()["errcode"] == "M_UNKNOWN"
    assert int(response.headers["Retry-After"]) >= 1
    assert search_counts(timeout_api) == {"503": 1.0}
    # The pool is fine afterwards.
    assert post(timeout_api, {"search_term": "eve"}).status_code == 200


@pytest.fixture
def unreachable_db_api(
    api_settings: Settings,
    db: Engine,
    redis_client: object,
    homeserver: FakeHomeserver,
    tmp_path: Path,
) -> Iterator[RunningApi]:
    # Searches use a database that is not there (transactions still work).
    if is_sqlite(db):
        away = create_engine(f"sqlite:///{tmp_path}/no/such/directory.sqlite3")
    else:
        away = create_engine("postgresql+psycopg://postgres@127.0.0.1:9/nowhere")
    yield from serve(api_settings, db, homeserver, search_engine=away)
    away.dispose()


def test_a_database_that_is_away_is_a_503_in_matrix_json(unreachable_db_api: RunningApi) -> None:
    unreachable_db_api.homeserver.set_token("eve-token", EVE)
    response = post(unreachable_db_api, {"search_term": "eve"})
    assert response.status_code == 503, response.text
    assert response.json()["errcode"] == "M_UNKNOWN"
    assert response.headers["Retry-After"].isdigit()
    assert search_counts(unreachable_db_api) == {"503": 1.0}


@pytest.fixture
def broken_api(
    api_settings: Settings, db: Engine, redis_client: object, homeserver: FakeHomeserver
) -> Iterator[RunningApi]:
    def creator() -> object:
        raise RuntimeError("a bug nobody foresaw")

    # A search pool whose driver fails in a way that is no database error: a bug.
    broken = create_engine("postgresql+psycopg://", creator=creator)
    yield from serve(api_settings, db, homeserver, search_engine=broken)
    broken.dispose()


def test_an_unexpected_error_is_a_500_in_matrix_json_and_counted(broken_api: RunningApi) -> None:
    broken_api.homeserver.set_token("eve-token", EVE)
    response = post(broken_api, {"search_term": "eve"})
    assert response.status_code == 500
    assert response.json() == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    assert response.headers["content-type"] == "application/json"
    assert search_counts(broken_api) == {"500": 1.0}
