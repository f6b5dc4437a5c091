"""Who is listed (directory/listing.py, README "Who is listed"), on PostgreSQL or SQLite
with real HTTP answers from the fake homeserver: some users keep their entry (their
memberships still decide who shares a room) but search never returns them: our own
sender, other appservices' users, EXCLUDE_USER_REGEXES, support, deactivated and locked
local users (with ADMIN_TOKEN), and users whose public profile opts out (MSC4258)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, select

from directory.clock import now_ms
from directory.config import Settings
from directory.dedup import UNSEEN
from directory.fetching import DestinationRun
from directory.ingest import ingest_events
from directory.listing import (
    DEACTIVATED,
    EXCLUDED,
    GUEST,
    LOCKED,
    NAMESPACE,
    OPTED_OUT,
    SENDER,
    SUPPORT,
    load_rules,
    reevaluate,
    rules_for,
)
from directory.models import room_members, user_directory
from directory.profile_client import ProfileClient, parse_profile
from directory.registration import Registration
from directory.search import search_directory
from directory.storage import entries, pending
from tests.conftest import SERVER_NAME, with_settings
from tests.support.events import join_rules, member
from tests.support.fake_homeserver import NOT_FOUND, FakeHomeserver

BOB = f"@bob:{SERVER_NAME}"
ALICE = "@alice:remote.test"
PUBLIC = "!public:remote.test"
ADMIN_TOKEN = "admin-secret"
VISIBILITY = "m.user_directory.visibility"


def apply(engine: Engine, settings: Settings, *events: dict) -> None:
    """Events through the inbox, applied as the consumer applies them."""
    ingest_events(engine, settings, list(events), lambda _outcome: None)


def listing(engine: Engine, user_id: str) -> tuple[bool, str | None] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(user_directory.c.listed, user_directory.c.unlisted_reason).where(
                user_directory.c.user_id == user_id
            )
        ).one_or_none()
    return None if row is None else (bool(row[0]), row[1])


def found(engine: Engine, searcher: str, term: str) -> list[str]:
    with engine.connect() as conn:
        return [hit.user_id for hit in search_directory(conn, searcher, term, 10).results]


def member_rows(engine: Engine, user_id: str) -> int:
    with engine.connect() as conn:
        return len(
            conn.execute(select(room_members).where(room_members.c.user_id == user_id)).all()
        )


def queue_fetches(engine: Engine, users: list[str]) -> None:
    """Fetches due now for these users (entries created first if missing)."""
    now = now_ms()
    with engine.begin() as conn:
        missing = [u for u in users if entries.public_entry(conn, u) is None]
        entries.create_placeholders(conn, dict.fromkeys(missing, UNSEEN), now, now + 3_600_000)
        pending.queue(conn, users, "refresh", now)


def fetch(engine: Engine, redis_client: redis.Redis, settings: Settings, server_name: str) -> None:
    with ProfileClient(settings) as client:
        report = DestinationRun(engine, redis_client, client, settings).run(server_name)
    assert report.failed == 0, report


def sweep(engine: Engine, settings: Settings, batch: int = 2) -> int:
    """Every entry judged again against the settings' rules, `batch` at a time."""
    rules, after, changed = rules_for(settings), None, 0
    while True:
        with engine.begin() as conn:
            after, n = reevaluate(conn, rules, after, batch)
        changed += n
        if after is None:
            return changed


def registration_file(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


BRIDGE = """\
id: telegram
url: http://127.0.0.1:29317
as_token: a
hs_token: h
sender_localpart: telegrambot
namespaces:
  users:
    - exclusive: true
      regex: '@telegram_.*:ours\\.test'
    - exclusive: false
      regex: '@irc_.*:ours\\.test'
  aliases: []
"""


# -- 1. our own sender ---------------------------------------------------------------


def test_our_sender_is_held_but_never_listed_and_the_registration_names_the_same_user(
    db: Engine, settings: Settings
) -> None:
    settings = with_settings(settings, sender_localpart="dirbot")
    sender = f"@dirbot:{SERVER_NAME}"
    assert Registration.for_settings(settings).sender_localpart == "dirbot"
    assert 'sender_localpart: "dirbot"' in Registration.for_settings(settings).yaml()

    apply(
        db,
        settings,
        join_rules(PUBLIC, "public"),
        member(PUBLIC, BOB),
        member(PUBLIC, sender),
        member(PUBLIC, ALICE),
    )

    assert listing(db, sender) == (False, SENDER)
    assert listing(db, ALICE) == (True, None)
    assert member_rows(db, sender) == 1  # still a member: it still shares the room
    assert found(db, BOB, "dirbot") == []
    assert found(db, BOB, "alice") == [ALICE]


# -- 2. other appservices and EXCLUDE_USER_REGEXES --------------------------------------


def test_other_appservices_exclusive_users_and_senders_are_unlisted(
    db: Engine, settings: Settings, tmp_path: Path
) -> None:
    path = registration_file(tmp_path, "telegram.yaml", BRIDGE)
    settings = with_settings(settings, appservice_registration_files=f" {path} ,")
    puppet, bot, irc = (f"@{n}:{SERVER_NAME}" for n in ("telegram_42", "telegrambot", "irc_7"))

    apply(db, settings, member(PUBLIC, BOB), member(PUBLIC, puppet), member(PUBLIC, bot))
    apply(db, settings, member(PUBLIC, irc))

    assert listing(db, puppet) == (False, NAMESPACE)
    assert listing(db, bot) == (False, NAMESPACE)
    assert listing(db, irc) == (True, None)  # a non-exclusive namespace lists its users
    assert found(db, BOB, "telegram") == []


def test_namespaces_match_as_synapse_does_and_our_own_registration_is_ours(
    tmp_path: Path,
) -> None:
    """Synapse's directory tests its exclusive regexes with re.match: anchored at the
    start of the user id, not at its end."""
    ours = registration_file(
        tmp_path,
        "ours.yaml",
        "sender_localpart: userdirectory\nnamespaces:\n"
        "  users:\n    - {exclusive: false, regex: '@.*'}\n",
    )
    slack = registration_file(
        tmp_path,
        "slack.yaml",
        "sender_localpart: slackbot\nnamespaces:\n"
        "  users:\n    - {exclusive: true, regex: '@slack_'}\n",
    )
    rules = load_rules(
        server_name=SERVER_NAME,
        sender_localpart="userdirectory",
        registration_files=f"{ours},{slack}",
        exclude_user_regexes="",
        show_locked_users=False,
    )
    assert rules.configured_reason(f"@slack_u1:{SERVER_NAME}") == NAMESPACE
    assert rules.configured_reason("@slack_u1:remote.test") == NAMESPACE
    assert rules.configured_reason(f"@my_slack_u1:{SERVER_NAME}") is None
    assert rules.configured_reason(f"@slackbot:{SERVER_NAME}") == NAMESPACE
    assert rules.configured_reason(f"@userdirectory:{SERVER_NAME}") == SENDER
    assert rules.configured_reason(BOB) is None


@pytest.mark.parametrize(
    "regexes",
    ["@admin.*:ours\\.test, @.*:spam\\.example", "@admin.*:ours\\.test\n@.*:spam\\.example\n"],
)
def test_exclude_user_regexes_match_the_whole_user_id(
    db: Engine, settings: Settings, regexes: str
) -> None:
    settings = with_settings(settings, exclude_user_regexes=regexes)
    admin, spammer = f"@admin1:{SERVER_NAME}", "@x:spam.example"
    # Matches at the start only: the whole id must match.
    lookalike = "@admin1:ours.test.evil.example"

    apply(db, settings, *(member(PUBLIC, u) for u in (BOB, admin, spammer, lookalike)))

    assert listing(db, admin) == (False, EXCLUDED)
    assert listing(db, spammer) == (False, EXCLUDED)
    assert listing(db, lookalike) == (True, None)


def test_a_regex_with_a_comma_needs_its_own_line() -> None:
    rules = load_rules(
        server_name=SERVER_NAME,
        sender_localpart="userdirectory",
        registration_files="",
        exclude_user_regexes="@bot[0-9]{1,3}:ours\\.test\n@z:ours\\.test",
        show_locked_users=False,
    )
    assert rules.configured_reason("@bot12:ours.test") == EXCLUDED
    assert rules.configured_reason("@bot1234:ours.test") is None


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"APPSERVICE_REGISTRATION_FILES": "/nonexistent/bridge.yaml"}, "/nonexistent/bridge.yaml"),
        ({"EXCLUDE_USER_REGEXES": "@ok:x,@bad(:x"}, "bad regex '@bad(:x'"),
        ({"SENDER_LOCALPART": "@bot:x"}, "SENDER_LOCALPART"),
    ],
)
def test_a_bad_listing_setting_stops_the_start_with_a_clear_error(
    env: dict[str, str], says: str
) -> None:
    with pytest.raises(ValueError) as raised:
        Settings.from_env(env)
    assert says in str(raised.value)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("namespaces: {users: []}\n", "no sender_localpart"),
        (
            "sender_localpart: b\nnamespaces:\n"
            "  users:\n    - {exclusive: yes please, regex: '@a'}\n",
            "boolean exclusive",
        ),
        (
            "sender_localpart: b\nnamespaces:\n  users:\n    - {exclusive: true, regex: '@a['}\n",
            "bad regex",
        ),
        ("sender_localpart: [\n", "not YAML"),
    ],
)
def test_a_broken_registration_file_is_refused(tmp_path: Path, body: str, says: str) -> None:
    path = registration_file(tmp_path, "broken.yaml", body)
    with pytest.raises(ValueError) as raised:
        Settings.from_env({"APPSERVICE_REGISTRATION_FILES": path})
    assert says in str(raised.value) and path in str(raised.value)


# -- 4. MSC4258: the profile's m.user_directory.visibility ------------------------------


@pytest.mark.parametrize(
    ("profile", "local_listed", "remote_listed"),
    [
        ({VISIBILITY: "hidden"}, False, False),
        ({VISIBILITY: "local"}, True, False),
        ({VISIBILITY: "restricted"}, False, False),
        ({VISIBILITY: "remote"}, True, True),
        ({VISIBILITY: "federated"}, True, True),
        ({VISIBILITY: "public"}, True, True),
        ({VISIBILITY: None}, True, True),
        ({}, True, True),
        ({VISIBILITY: "HIDDEN"}, True, True),  # not a value the proposal names
        ({VISIBILITY: ["hidden"]}, True, True),
        ({"fr.tchap.user_directory.visibility": "hidden"}, False, False),
        ({VISIBILITY: None, "fr.tchap.user_directory.visibility": "hidden"}, True, True),
    ],
)
def test_each_visibility_value_lists_local_and_remote_users_as_documented(
    profile: dict[str, Any], local_listed: bool, remote_listed: bool
) -> None:
    result = parse_profile(json.dumps({"displayname": "X", **profile}).encode())
    assert result.profile is not None and result.profile.displayname == "X"
    rules = load_rules(
        server_name=SERVER_NAME,
        sender_localpart="userdirectory",
        registration_files="",
        exclude_user_regexes="",
        show_locked_users=False,
    )
    assert (rules.reason(BOB, result.visibility, None) is None) == local_listed
    assert (rules.reason(ALICE, result.visibility, None) is None) == remote_listed


def test_a_hidden_profile_is_never_listed_until_the_field_changes_back(
    db: Engine, redis_client: redis.Redis, settings: Settings, homeserver: FakeHomeserver
) -> None:
    settings = with_settings(settings, homeserver_url=homeserver.url)
    apply(db, settings, join_rules(PUBLIC, "public"), member(PUBLIC, BOB), member(PUBLIC, ALICE))
    homeserver.set_profile(ALICE, "Alice", **{VISIBILITY: "hidden"})
    fetch(db, redis_client, settings, "remote.test")
    assert listing(db, ALICE) == (False, OPTED_OUT)
    assert found(db, BOB, "alice") == []
    assert member_rows(db, ALICE) == 1

    # A 404 says nothing about the preference: it stands.
    homeserver.script(ALICE, NOT_FOUND)
    queue_fetches(db, [ALICE])
    fetch(db, redis_client, settings, "remote.test")
    assert listing(db, ALICE) == (False, OPTED_OUT)

    homeserver.set_profile(ALICE, "Alice", **{VISIBILITY: "remote"})
    queue_fetches(db, [ALICE])
    fetch(db, redis_client, settings, "remote.test")
    assert listing(db, ALICE) == (True, None)
    assert found(db, BOB, "alice") == [ALICE]


# -- 3. support, deactivated and locked local users (ADMIN_TOKEN) ------------------------


def local(name: str) -> str:
    return f"@{name}:{SERVER_NAME}"


def test_support_deactivated_guest_and_locked_local_users_are_unlisted_with_admin_token(
    db: Engine, redis_client: redis.Redis, settings: Settings, homeserver: FakeHomeserver
) -> None:
    settings = with_settings(settings, homeserver_url=homeserver.url, admin_token=ADMIN_TOKEN)
    homeserver.set_admin_token(ADMIN_TOKEN)
    support, gone, locked, normal = (local(n) for n in ("support", "gone", "locked", "normal"))
    guest = local("7")
    homeserver.set_account(support, user_type="support")
    homeserver.set_account(guest, is_guest=True)
    homeserver.set_account(gone, deactivated=True, locked=True)
    homeserver.set_account(locked, locked=True)
    homeserver.set_account(normal)
    users = (support, gone, locked, normal, guest, ALICE)
    for user in users:
        homeserver.set_profile(user, user[1:].split(":")[0].title())
    apply(db, settings, *(member(PUBLIC, u) for u in (BOB, *users)))
    queue_fetches(db, [BOB, *users])
    homeserver.set_account(BOB)

    fetch(db, redis_client, settings, SERVER_NAME)
    fetch(db, redis_client, settings, "remote.test")

    assert listing(db, support) == (False, SUPPORT)
    assert listing(db, gone) == (False, DEACTIVATED)
    assert listing(db, locked) == (False, LOCKED)
    assert listing(db, guest) == (False, GUEST)
    assert listing(db, normal) == (True, None)
    assert listing(db, ALICE) == (True, None)
    # Only local users are asked about, each once per fetch.
    assert sorted(homeserver.account_reads) == sorted([BOB, support, gone, locked, normal, guest])
    assert found(db, BOB, "locked") == []

    # SHOW_LOCKED_USERS is configuration: it reaches the entries held at the next sweep,
    # with no fetch (the admin API's answer is kept).
    assert sweep(db, with_settings(settings, show_locked_users=True)) == 1
    assert listing(db, locked) == (True, None)
    assert listing(db, gone) == (False, DEACTIVATED)
    assert found(db, BOB, "locked") == [locked]


def test_without_admin_token_nobody_is_asked_and_the_rule_does_nothing(
    db: Engine, redis_client: redis.Redis, settings: Settings, homeserver: FakeHomeserver
) -> None:
    settings = with_settings(settings, homeserver_url=homeserver.url)
    homeserver.set_admin_token(ADMIN_TOKEN)
    gone = local("gone")
    homeserver.set_account(gone, deactivated=True)
    homeserver.set_profile(gone, "Gone")
    apply(db, settings, member(PUBLIC, BOB), member(PUBLIC, gone))

    fetch(db, redis_client, settings, SERVER_NAME)

    assert homeserver.account_reads == []
    assert listing(db, gone) == (True, None)


def test_a_deactivated_user_is_unlisted_at_the_next_fetch_before_any_leave(
    db: Engine, redis_client: redis.Redis, settings: Settings, homeserver: FakeHomeserver
) -> None:
    settings = with_settings(settings, homeserver_url=homeserver.url, admin_token=ADMIN_TOKEN)
    homeserver.set_admin_token(ADMIN_TOKEN)
    carl = local("carl")
    homeserver.set_account(carl)
    homeserver.set_account(BOB)
    homeserver.set_profile(carl, "Carl")
    apply(db, settings, member(PUBLIC, BOB), member(PUBLIC, carl))
    fetch(db, redis_client, settings, SERVER_NAME)
    assert listing(db, carl) == (True, None)

    # Deactivated on the homeserver; a refresh (or the rename to nothing Synapse makes
    # when it deactivates) fetches them again before their leaves are sent.
    homeserver.set_account(carl, deactivated=True)
    homeserver.set_profile(carl)
    queue_fetches(db, [carl])
    fetch(db, redis_client, settings, SERVER_NAME)
    assert listing(db, carl) == (False, DEACTIVATED)
    assert member_rows(db, carl) == 1

    # The admin API failing (a token revoked) forgets nothing it said before.
    homeserver.set_admin_token("another")
    queue_fetches(db, [carl])
    fetch(db, redis_client, settings, SERVER_NAME)
    assert listing(db, carl) == (False, DEACTIVATED)


# -- 5. a configuration change reaches the entries held -------------------------------------


def test_a_changed_configuration_is_applied_to_every_entry_held_by_the_sweep(
    db: Engine, redis_client: redis.Redis, settings: Settings, homeserver: FakeHomeserver
) -> None:
    settings = with_settings(settings, homeserver_url=homeserver.url)
    users = [f"@user{i}:remote.test" for i in range(7)]
    hidden = users[0]
    homeserver.set_profile(hidden, "Hidden", **{VISIBILITY: "hidden"})
    apply(db, settings, member(PUBLIC, BOB), *(member(PUBLIC, u) for u in users))
    fetch(db, redis_client, settings, "remote.test")
    assert listing(db, hidden) == (False, OPTED_OUT)
    assert sweep(db, settings) == 0  # nothing to change

    excluding = with_settings(settings, exclude_user_regexes="@user[0-4]:remote\\.test")
    # Configuration comes first: the opted-out user is now unlisted as excluded.
    assert sweep(db, excluding) == 5
    assert [listing(db, u) for u in users] == [(False, EXCLUDED)] * 5 + [(True, None)] * 2
    # A new entry gets the same at creation.
    apply(
        db, excluding, member(PUBLIC, "@user3x:remote.test"), member(PUBLIC, "@user4:remote.test")
    )
    assert listing(db, "@user3x:remote.test") == (True, None)

    # Back: the opted-out user stays unlisted for their own reason.
    assert sweep(db, settings) == 5
    assert listing(db, hidden) == (False, OPTED_OUT)
    assert all(listing(db, u) == (True, None) for u in users[1:])
