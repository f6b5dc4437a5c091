"""directory/logs.py: secrets are scrubbed from every line, JSON lines carry a record's
fields, uvicorn's access log loses token-like query values, and a fetch run logs one
line per fetch."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import redis
from sqlalchemy import Engine

from directory import logs
from directory.clock import now_ms
from directory.config import Settings
from directory.dedup import SeenState
from directory.events import ProfileValue
from directory.fetching import DestinationRun
from directory.logs import (
    REDACTED,
    AccessLogFilter,
    JsonFormatter,
    RedactingHandler,
    Redactor,
    add_context,
    redact_query,
    settings_secrets,
)
from directory.profile_client import ProfileClient
from directory.storage import entries, pending
from tests.conftest import with_settings
from tests.support.fake_homeserver import BAD_GATEWAY, FakeHomeserver


def test_settings_list_every_configured_secret(settings: Settings) -> None:
    configured = with_settings(
        settings,
        admin_token="admin-secret",
        database_url="postgresql://dir:db%2Fpass@db.example/directory",
        redis_url="redis://:redis-pass@127.0.0.1:6379/0",
        homeserver_url="https://user:hs-pass@hs.example",
    )
    secrets = set(settings_secrets(configured))
    assert {"as-secret", "hs-secret", "admin-secret", "db/pass", "db%2Fpass"} <= secrets
    assert {"redis-pass", "hs-pass"} <= secrets


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("sent as-secret and hs-secret", f"sent {REDACTED} and {REDACTED}"),
        (
            "GET /x?user_id=%40a%3Ab&access_token=abc123 HTTP/1.1",
            f"GET /x?user_id=%40a%3Ab&access_token={REDACTED} HTTP/1.1",
        ),
        ("AS_TOKEN=abcdef PASSWORD=hunter22 login_token=xyz", None),
        ("Authorization: Bearer abc.def-ghi", f"Authorization: Bearer {REDACTED}"),
        ("token syt_Ym9i_AbCdEfGhIjKlMn_0abcde was refused", f"token {REDACTED} was refused"),
        (
            "nothing secret here: user_id=@a:b, 3 rooms",
            "nothing secret here: user_id=@a:b, 3 rooms",
        ),
        ("short values like abc are left alone", "short values like abc are left alone"),
    ],
)
def test_the_redactor_scrubs_secrets_and_only_them(line: str, expected: str | None) -> None:
    redacted = Redactor(["as-secret", "hs-secret", "abc"])(line)
    if expected is not None:
        assert redacted == expected
    for secret in ("as-secret", "hs-secret", "abc123", "abcdef", "hunter22", "xyz", "ghi"):
        assert secret not in redacted


def test_token_like_query_parameters_are_redacted_whatever_their_spelling() -> None:
    assert redact_query("/search") == "/search"
    assert redact_query("/t/1?access_token=s3cret") == f"/t/1?access_token={REDACTED}"
    assert (
        redact_query("/t/1?user_id=%40a%3Ab&access%5Ftoken=s3cret&ACCESS_TOKEN=x&flag")
        == f"/t/1?user_id=%40a%3Ab&access%5Ftoken={REDACTED}&ACCESS_TOKEN={REDACTED}&flag"
    )


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("directory.test", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_a_json_line_has_the_records_fields_and_no_secret() -> None:
    formatter = JsonFormatter("worker", Redactor(["hs-secret"]))
    rec = record(
        "fetch of %s: %s\nnext line hs-secret",
        "@a:b",
        "ok",
        user_id="@a:b",
        server_name="b",
        duration_ms=1.5,
        generation=7,
        error="echo ?access_token=hs-secret",
        color_message="skipped",
        access_token="passed by mistake",
    )

    line = formatter.format(rec)

    assert "\n" not in line and "hs-secret" not in line
    data = json.loads(line)
    assert list(data)[:7] == [
        "time",
        "level",
        "logger",
        "message",
        "process",
        "user_id",
        "server_name",
    ]
    assert data["time"].endswith("Z") and data["level"] == "INFO"
    assert data["logger"] == "directory.test" and data["process"] == "worker"
    assert data["message"] == f"fetch of @a:b: ok\nnext line {REDACTED}"
    assert (data["duration_ms"], data["generation"]) == (1.5, 7)
    assert data["error"] == f"echo ?access_token={REDACTED}"
    assert "color_message" not in data
    assert data["access_token"] == REDACTED


def test_an_exceptions_traceback_is_one_field_and_scrubbed() -> None:
    formatter = JsonFormatter("server", Redactor(["hs-secret"]))
    try:
        raise RuntimeError("refused https://hs/x?access_token=user-token-1 with hs-secret")
    except RuntimeError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())

    data = json.loads(formatter.format(rec))

    assert "RuntimeError" in data["exception"]
    assert "user-token-1" not in data["exception"] and "hs-secret" not in data["exception"]


def test_every_handled_line_is_scrubbed_and_carries_the_context(
    request: pytest.FixtureRequest,
) -> None:
    def provider(_record: logging.LogRecord) -> dict[str, object]:
        return {"task_id": "t-1", "task": "tasks.x"}

    add_context(provider)
    request.addfinalizer(lambda: logs._context_providers.remove(provider))
    out = io.StringIO()
    handler = RedactingHandler(out, Redactor(["as-secret"]))
    handler.setFormatter(logging.Formatter("%(message)s %(task_id)s"))

    handler.handle(record("token %s", "as-secret"))
    handler.handle(record("mine", task_id="t-2"))

    assert out.getvalue() == f"token {REDACTED} t-1\nmine t-2\n"


def test_uvicorns_access_records_lose_the_query_tokens_and_gain_fields() -> None:
    rec = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "PUT", "/_matrix/app/v1/transactions/1?access_token=hs-x1", "1.1", 200),
        None,
    )

    assert AccessLogFilter().filter(rec)

    assert "hs-x1" not in rec.getMessage()
    assert rec.path == f"/_matrix/app/v1/transactions/1?access_token={REDACTED}"
    assert (rec.method, rec.status_code, rec.client) == ("PUT", 200, "127.0.0.1:5")


def test_a_run_logs_one_info_line_per_fetch_with_its_fields(
    db: Engine,
    redis_client: redis.Redis,
    settings: Settings,
    homeserver: FakeHomeserver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ok, missing, failing = "@ok:remote.test", "@missing:remote.test", "@failing:remote.test"
    homeserver.set_profile(ok, "Ok")
    homeserver.script(failing, BAD_GATEWAY)
    now = now_ms()
    with db.begin() as conn:
        users = {u: SeenState(ProfileValue(None, None), "!r:x") for u in (ok, missing, failing)}
        entries.create_placeholders(conn, users, now, now + 3_600_000)
        pending.queue(conn, list(users), "first", now)
        generations = pending.current_generations(conn, list(users))
    settings = with_settings(settings, homeserver_url=homeserver.url)
    caplog.set_level(logging.DEBUG)

    with ProfileClient(settings) as client:
        DestinationRun(db, redis_client, client, settings).run("remote.test")

    lines = [r for r in caplog.records if r.name.startswith("directory.")]
    fetches = [r for r in lines if hasattr(r, "outcome")]
    assert sorted(r.user_id for r in fetches) == sorted(users)
    outcomes = {r.user_id: r for r in fetches}
    assert outcomes[ok].outcome == "ok" and not hasattr(outcomes[ok], "error")
    assert outcomes[missing].outcome == "not_found"
    assert outcomes[failing].outcome == "transient"
    assert outcomes[failing].error.startswith("HTTP 502")
    for user_id, rec in outcomes.items():
        assert rec.levelno == logging.INFO
        assert rec.server_name == "remote.test" and rec.generation == generations[user_id]
        assert rec.duration_ms >= 0
        assert user_id in rec.getMessage() and rec.outcome in rec.getMessage()
    # No other line per fetch (the client logs none of its own).
    assert not [r for r in lines if r.name == "directory.profile_client"]
