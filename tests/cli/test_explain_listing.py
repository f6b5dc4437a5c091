"""`python -m directory explain USER_ID` says when a user is held but unlisted, and why
(directory/listing.py), and when the current rules would judge them otherwise."""

from __future__ import annotations

from sqlalchemy import Engine

from directory.clock import now_ms
from directory.config import Settings
from directory.events import ProfileValue
from directory.fetching import apply_results
from directory.ingest import ingest_events
from directory.profile_client import FetchResult, Outcome
from tests.cli.conftest import ALICE, BOB, CAROL, claim, run_cli
from tests.conftest import SERVER_NAME, with_settings
from tests.support.events import join_rules, member

PUBLIC = "!pub:remote.test"


def apply(engine: Engine, settings: Settings, events: list[dict]) -> None:
    """Events applied by the inbox consumer, with the settings' listing rules."""
    ingest_events(engine, settings, events, lambda _outcome: None)


def answered(engine: Engine, settings: Settings, user_id: str, result: FetchResult) -> None:
    taken = claim(engine, "remote.test")[user_id]
    with engine.begin() as conn:
        apply_results(conn, [(taken, result)], settings, now_ms())


def test_explain_says_why_a_user_is_unlisted(db: Engine, cli_settings: Settings) -> None:
    sender = f"@userdirectory:{SERVER_NAME}"
    apply(
        db,
        cli_settings,
        [join_rules(PUBLIC, "public"), member(PUBLIC, BOB), member(PUBLIC, ALICE)],
    )
    apply(db, cli_settings, [member(PUBLIC, CAROL), member(PUBLIC, sender)])
    hidden = FetchResult(
        Outcome.OK, profile=ProfileValue("Alice", None), status=200, visibility="hidden"
    )
    answered(db, cli_settings, ALICE, hidden)

    out = run_cli(cli_settings, "explain", ALICE)
    assert out.returncode == 0, out.stderr
    assert "  listed        no: held, but never returned by search" in out.stdout
    assert (
        "  unlisted      opted out of the directory (m.user_directory.visibility=hidden)"
        in out.stdout
    )
    assert "  strangers     cannot find them (not listed)" in out.stdout
    assert "  room mates    cannot find them (not listed)" in out.stdout

    out = run_cli(cli_settings, "explain", sender)
    assert out.returncode == 0, out.stderr
    assert f"  unlisted      this appservice's own sender (SENDER_LOCALPART, {sender})" in (
        out.stdout
    )

    # Listed, but the configuration now excludes them: explain says so before the sweep.
    out = run_cli(cli_settings, "explain", CAROL)
    assert "unlisted" not in out.stdout and "rules now" not in out.stdout
    excluding = with_settings(cli_settings, exclude_user_regexes="@carol:.*")
    out = run_cli(excluding, "explain", CAROL)
    assert out.returncode == 0, out.stderr
    assert "  listed        yes" in out.stdout
    assert (
        "  rules now     matches EXCLUDE_USER_REGEXES: @carol:.*"
        " (applied by the next listing sweep)" in out.stdout
    )
