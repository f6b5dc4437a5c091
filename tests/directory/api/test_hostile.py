"""Hostile input to the search, over real HTTP to the real server process (server.py, as
an operator runs it), with a fake homeserver answering whoami on a real socket and the
real database and Redis: no input makes a 500, every error is Matrix JSON with an
errcode, the server logs no traceback and no token, and random tokens sprayed from one
address reach the homeserver at most SEARCH_UNVERIFIED_RATE_BURST times."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from directory.config import Settings
from directory.ingest import apply_accepted
from tests.conftest import APPSERVICE_SENDER, SERVER_NAME, with_settings
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import WHOAMI_PATH, FakeHomeserver
from tests.support.processes import ProcessGroup
from tests.support.services import free_port

SEARCH = "/_matrix/client/v3/user_directory/search"
BOB = f"@bob:{SERVER_NAME}"
BURST = 5


def hostile_requests(token: str) -> list[tuple[str, dict]]:
    """(label, httpx request arguments) of every hostile request, all from Bob (a valid
    token) unless the token is the hostile part."""
    auth = {"Authorization": f"Bearer {token}"}
    json_headers = {**auth, "Content-Type": "application/json"}

    def raw(label: str, body: bytes, headers: dict | None = None) -> tuple[str, dict]:
        return label, {"content": body, "headers": json_headers if headers is None else headers}

    def body(label: str, value: object) -> tuple[str, dict]:
        return label, {"json": value, "headers": auth}

    requests: list[tuple[str, dict]] = []
    # Tokens, each from its own address (X-Forwarded-For, trusted from 127.0.0.1), so
    # the address limit does not hide what the token alone gets.
    tokens: list[tuple[str, dict, str]] = [
        ("non-ASCII header", {"Authorization": "Bearer t\xc3\xa9st".encode("latin-1")}, ""),
        ("non-ASCII query", {}, "?access_token=t%C3%A9st"),
        ("10 KB header", {"Authorization": "Bearer " + "x" * 10_000}, ""),
        ("10 KB query", {}, "?access_token=" + "x" * 10_000),
        ("control characters", {}, "?access_token=a%01%1b%7f"),
        ("NUL", {}, "?access_token=a%00b"),
        ("CR LF", {}, "?access_token=a%0d%0aX-Injected:%20yes"),
        ("invalid UTF-8", {}, "?access_token=%FF%FE%C3"),
        ("invalid percent", {}, "?access_token=%ZZ%"),
        ("empty query", {}, "?access_token="),
        ("empty header", {"Authorization": "Bearer"}, ""),
        ("Basic", {"Authorization": "Basic dXNlcjpwYXNz"}, ""),
        ("two tokens", {"Authorization": f"Bearer {token} {token}"}, ""),
        ("unknown", {"Authorization": "Bearer syt_nope_nope_nope"}, ""),
    ]
    for i, (label, headers, query) in enumerate(tokens):
        forwarded = {"X-Forwarded-For": f"10.1.0.{i + 1}", **headers}
        args = {"url": SEARCH + query, "json": {"search_term": "a"}, "headers": forwarded}
        requests.append((f"token: {label}", args))
    # Bodies.
    deep_array = b'{"search_term": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    deep_object = b'{"a":' * 1500 + b"1" + b"}" * 1500
    requests += [
        raw("body: 5,000 nested arrays", deep_array),
        raw("body: 1,500 nested objects", deep_object),
        raw(
            "body: search_term nested 1,200 deep",
            b'{"search_term":' + b"[" * 1200 + b"]" * 1200 + b"}",
        ),
        raw("body: 1 MB", b'{"search_term": "' + b"a" * 1_000_000 + b'"}'),
        raw("body: 1 MB without Content-Length", b"", None),
        raw("body: invalid UTF-8", b'{"search_term": "\xff\xfe"}'),
        raw("body: UTF-16", '{"search_term": "a"}'.encode("utf-16")),
        raw("body: BOM", b'\xef\xbb\xbf{"search_term": "a"}'),
        raw("body: empty", b""),
        raw("body: whitespace", b"   \n"),
        raw("body: not JSON", b"{oops"),
        raw("body: trailing garbage", b'{"search_term": "a"} x'),
        raw("body: NaN", b'{"search_term": "a", "x": NaN}'),
        raw("body: duplicate keys", b'{"search_term": "a", "search_term": 5}'),
        raw("body: duplicate keys, string last", b'{"search_term": 5, "search_term": "bob"}'),
        body("body: array", ["search_term", "a"]),
        body("body: number", 42),
        body("body: string", "search_term"),
        body("body: null", None),
        body("body: true", True),
        body("body: empty object", {}),
        raw(
            "content type: text/plain",
            b'{"search_term": "a"}',
            {**auth, "Content-Type": "text/plain"},
        ),
        raw(
            "content type: form",
            b"search_term=a",
            {**auth, "Content-Type": "application/x-www-form-urlencoded"},
        ),
        raw(
            "content type: multipart",
            b"--x\r\n\r\n--x--",
            {**auth, "Content-Type": "multipart/form-data; boundary=x"},
        ),
        raw("content type: none", b'{"search_term": "a"}', auth),
        raw(
            "content type: garbage",
            b'{"search_term": "a"}',
            {**auth, "Content-Type": ";;==; charset=klingon"},
        ),
    ]
    # The 1 MB body without Content-Length: streamed in chunks.
    label, args = requests[[r[0] for r in requests].index("body: 1 MB without Content-Length")]
    args["content"] = iter([b'{"search_term": "'] + [b"a" * 65536] * 16 + [b'"}'])
    # Limits.
    for limit in (
        "10",
        10.0,
        -1,
        "abc",
        None,
        True,
        False,
        [],
        {},
        "1.5",
        " 3 ",
        "",
        "\u0661\u0660",
    ):
        requests.append(body(f"limit: {limit!r}", {"search_term": "user", "limit": limit}))
    for literal in (b"1e309", b"-1e309", b"NaN", b"Infinity", b"2" + b"0" * 21, b"9" * 5000):
        requests.append(
            raw(f"limit: {literal[:20]!r}", b'{"search_term": "user", "limit": ' + literal + b"}")
        )
    # Terms.
    terms: list[tuple[str, object]] = [
        ("empty", ""),
        ("spaces", "   "),
        ("10 KB", "a" * 10_240),
        ("10 KB of words", "ab " * 3400),
        ("1,000 one-letter words", " ".join("abcdefghij"[i % 10] for i in range(1000))),
        ("RTL marks", "\u202e\u200fuser\u200e\u202c"),
        ("zero width", "\u200b\u2060\ufeff"),
        ("combining marks", "u" + "\u0301" * 500),
        ("NFKC expanding", "\ufdfa" * 300),
        ("percent", "%"),
        ("underscore", "_"),
        ("backslash", "\\"),
        ("quote", "'"),
        ("LIKE and SQL", "%_\\'\"; DROP TABLE user_directory; --"),
        ("regex", ".*[(?"),
        ("tsquery", "a & !b | c:* <-> (d)"),
        ("user id", BOB),
        ("punctuation", "@:!#$^&*()"),
        ("emoji", "\U0001f600" * 100),
        ("null", None),
        ("number", 5),
        ("list", ["user"]),
    ]
    for label, term in terms:
        requests.append(body(f"term: {label}", {"search_term": term}))
    for label, escaped in (
        ("NUL", b"user\\u0000x"),
        ("lone high surrogate", b"\\ud800"),
        ("lone low surrogate", b"user\\udfff"),
        ("reversed pair", b"\\udc00\\ud800"),
        ("control characters", b"\\u0001\\u001b\\u007f\\u0085"),
    ):
        requests.append(raw(f"term: {label}", b'{"search_term": "' + escaped + b'"}'))
    return requests


def test_no_hostile_search_makes_a_500(
    db: Engine, redis_client: object, settings: Settings, tmp_path: Path
) -> None:
    token = f"bob-{secrets.token_urlsafe(24)}"
    sprayed = [f"spray-{secrets.token_urlsafe(24)}" for _ in range(30)]
    with FakeHomeserver() as homeserver:
        port = free_port()
        configured = with_settings(
            settings,
            homeserver_url=homeserver.url,
            http_port=port,
            search_rate_burst=10_000,
            search_rate_per_second=1_000.0,
            search_unverified_rate_burst=BURST,
            search_unverified_rate_per_second=0.01,
        )
        homeserver.set_token(configured.as_token, APPSERVICE_SENDER)
        homeserver.set_token(token, BOB)
        processes = ProcessGroup(configured, tmp_path)
        answers: list[tuple[str, httpx.Response]] = []
        try:
            processes.start_server()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                events = [join_rules("!pub:x", "public"), member("!pub:x", BOB)]
                events += [member("!pub:x", f"@user{i}:remote.test") for i in range(20)]
                events += [member("!pub:x", "@o'brien%_\\:remote.test")]
                put = client.put(
                    "/_matrix/app/v1/transactions/1",
                    json={"events": events},
                    headers={"Authorization": f"Bearer {configured.hs_token}"},
                )
                assert put.status_code == 200, put.text
                # Stands in for the events worker.
                while apply_accepted(db, configured, lambda _outcome: None).more:
                    pass

                for label, args in hostile_requests(token):
                    args = dict(args)
                    url = args.pop("url", SEARCH)
                    answers.append((label, client.post(url, **args)))

                before = homeserver.api_requests.count(WHOAMI_PATH)
                spray = [
                    client.post(
                        SEARCH,
                        json={"search_term": "a"},
                        headers={"Authorization": f"Bearer {t}", "X-Forwarded-For": "10.66.6.6"},
                    )
                    for t in sprayed
                ]
                spray_whoami = homeserver.api_requests.count(WHOAMI_PATH) - before
                answers += [("spray", response) for response in spray]
                # Another address is not held up by the spray.
                other = client.post(
                    SEARCH,
                    json={"search_term": "a"},
                    headers={"Authorization": "Bearer syt_x_y_z", "X-Forwarded-For": "10.7.7.7"},
                )
                answers.append(("other address", other))
                # The server is still fine for Bob.
                after = client.post(
                    SEARCH,
                    json={"search_term": "user", "limit": "3"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                metrics = client.get("/metrics").text
        finally:
            processes.kill_all()
    log = processes.log("server")

    failures = []
    for label, response in answers:
        if response.status_code >= 500:
            failures.append(f"{label}: {response.status_code} {response.text[:200]}")
            continue
        try:
            answer = response.json()
        except ValueError:
            failures.append(f"{label}: not JSON: {response.status_code} {response.text[:200]!r}")
            continue
        if response.status_code == 200:
            if not (
                isinstance(answer.get("results"), list) and isinstance(answer.get("limited"), bool)
            ):
                failures.append(f"{label}: 200 but {answer!r:.200}")
        elif not (
            isinstance(answer, dict)
            and isinstance(answer.get("errcode"), str)
            and answer["errcode"].startswith("M_")
            and isinstance(answer.get("error"), str)
        ):
            failures.append(
                f"{label}: {response.status_code} without a Matrix error: {answer!r:.200}"
            )
    assert not failures, "\n".join(failures)

    statuses = {label: response.status_code for label, response in answers if label != "spray"}
    # A few that must be exactly so.
    assert statuses["token: non-ASCII header"] == 401
    assert statuses["token: NUL"] == 401
    assert statuses["token: 10 KB header"] == 401
    assert statuses["token: unknown"] == 401
    assert statuses["body: 5,000 nested arrays"] == 400
    assert statuses["body: 1 MB"] == 413
    assert statuses["body: 1 MB without Content-Length"] == 413
    assert statuses["body: invalid UTF-8"] == 400
    assert statuses["body: array"] == 400
    assert statuses["limit: '10'"] == 200
    assert statuses["limit: 10.0"] == 200
    assert statuses["limit: b'1e309'"] == 400
    assert statuses["limit: b'NaN'"] == 400
    assert statuses["limit: True"] == 400
    assert statuses["term: lone high surrogate"] == 200
    assert statuses["term: NUL"] == 200
    assert statuses["term: LIKE and SQL"] == 200
    assert statuses["other address"] == 401
    assert after.status_code == 200 and len(after.json()["results"]) == 3
    percent = dict(answers)["term: percent"].json()
    assert [hit["user_id"] for hit in percent["results"]] in ([], ["@o'brien%_\\:remote.test"])

    spray_statuses = [response.status_code for response in spray]
    assert spray_statuses == [401] * BURST + [429] * (len(sprayed) - BURST), spray_statuses
    assert spray_whoami == BURST

    searches = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "directory_searches_total"
    }
    assert "500" not in searches and "503" not in searches, searches
    assert sum(searches.values()) == len(answers) + 1

    assert "Traceback" not in log, log[-3000:]
    for secret in [token, configured.hs_token, configured.as_token, *sprayed]:
        assert secret not in log
    assert "access_token=[redacted]" in log
