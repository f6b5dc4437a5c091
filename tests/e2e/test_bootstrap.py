"""Installing the directory on a homeserver that already has users and rooms, against real
Synapse homeservers: rooms are created on hs1 and hs2 (federating) before our appservice
is registered, so no event about them ever reaches us. `python -m directory bootstrap`
(with a server admin's token) then loads every room hs1 is in, and searches through our
endpoint find exactly whom the spec allows, by their global names, never by a per-room
name, and nobody from a room hs1 is not in. A second run exits 0 and changes nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, Table, func, select

from directory.config import PROJECT_ROOT
from directory.models import pending_fetches, room_members, rooms, user_directory
from directory.storage import inbox
from tests.e2e.conftest import LateRegistration
from tests.support.processes import settings_env, wait_until

pytestmark = pytest.mark.e2e

# What the CLI prints without a terminal: a progress line now and then and at the end,
# then the summary.
PROGRESS_LINE = re.compile(
    r"^rooms (?P<done>\d+)/(?P<total>\d+) \[[#.]+\] +\d+% \| memberships (?P<members>[\d,]+)"
    r" \| [\d,]+/s \| ETA \S+ \| failed (?P<failed>\d+)$",
    re.MULTILINE,
)
SUMMARY = re.compile(
    r"^bootstrap run (?P<run>\d+) finished in \S+: (?P<rooms>\d+) rooms loaded,"
    r" (?P<members>[\d,]+) memberships \([\d,]+/s\), (?P<failed>\d+) rooms failed$",
    re.MULTILINE,
)
# Per-room display names set below: none may ever be found.
PER_ROOM_NAMES = ("pubby", "delia", "dodo", "bobby", "gigi", "evie", "franky")


def run_bootstrap(testbed: LateRegistration, tmp_path: Path, label: str) -> str:
    """`python -m directory bootstrap` as an operator runs it; its output is printed
    (pytest -s shows it) and kept in a file. Returns stdout."""
    env = {**os.environ, **settings_env(testbed.settings)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "directory", "bootstrap"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    output = (
        f"$ python -m directory bootstrap   # {label}: exit {result.returncode}, {took:.1f} s\n"
        f"{result.stdout}{result.stderr}"
    )
    path = tmp_path / f"bootstrap-{label}.txt"
    path.write_text(output)
    print(f"\n--- {label} bootstrap, also in {path} ---\n{output}", end="")
    assert result.returncode == 0, output
    return result.stdout


def database_state(engine: Engine) -> dict[str, list[tuple]]:
    """What a bootstrap may change: entries, memberships, rooms' publicity and
    visibility, pending fetches (not when rooms were checked, nor their counters)."""
    with engine.connect() as conn:
        return {
            "user_directory": sorted(map(tuple, conn.execute(select(user_directory)))),
            "room_members": sorted(map(tuple, conn.execute(select(room_members)))),
            "rooms": sorted(
                map(
                    tuple,
                    conn.execute(
                        select(
                            rooms.c.room_id,
                            rooms.c.join_rule,
                            rooms.c.history_visibility,
                            rooms.c.is_public,
                            rooms.c.is_visible,
                            rooms.c.backfill_as,
                        )
                    ),
                )
            ),
            "pending_fetches": sorted(map(tuple, conn.execute(select(pending_fetches)))),
        }


def entries(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        rows = conn.execute(select(user_directory.c.user_id, user_directory.c.display_name))
        return {user_id: name for user_id, name in rows}


def member_pairs(engine: Engine) -> set[tuple[str, str]]:
    with engine.connect() as conn:
        return set(map(tuple, conn.execute(select(room_members.c.room_id, room_members.c.user_id))))


def room_state(engine: Engine) -> dict[str, tuple[str | None, str | None, bool, bool]]:
    """Each room's join rule, history visibility, is_public, is_visible."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                rooms.c.room_id,
                rooms.c.join_rule,
                rooms.c.history_visibility,
                rooms.c.is_public,
                rooms.c.is_visible,
            )
        )
        return {room: (rule, hv, bool(pub), bool(vis)) for room, rule, hv, pub, vis in rows}


def count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(table))


def settled(engine: Engine) -> bool:
    """Nothing waits in the inbox and no fetch is pending."""
    with engine.connect() as conn:
        return inbox.backlog(conn).events == 0 and not conn.scalar(
            select(func.count()).select_from(pending_fetches)
        )


def test_bootstrap_loads_rooms_that_existed_before_registration(
    late_registration: LateRegistration, tmp_path: Path
) -> None:
    testbed = late_registration
    hs1, hs2 = testbed.hs1, testbed.hs2
    test_started = time.monotonic()

    # 1. A living federation, before the directory exists.
    bob = hs1.register("bob", displayname="Bob")
    eve = hs1.register("eve", displayname="Eve")
    carol = hs1.register("carol", displayname="Carol")
    admin = hs1.register_admin("admin")
    alice = hs2.register("alice", displayname="Alice")
    dave = hs2.register("dave", displayname="Dave")
    frank = hs2.register("frank", displayname="Frank")
    grace = hs2.register("grace", displayname="Grace")

    public = alice.create_room(public=True)  # alice, bob, eve
    bob.join(public, via=hs2.server_name)
    eve.join(public, via=hs2.server_name)
    with_alice = alice.create_room(public=False, invite=[bob.user_id])  # alice, bob
    bob.join(with_alice, via=hs2.server_name)
    with_dave = dave.create_room(public=False, invite=[bob.user_id])  # dave, bob
    bob.join(with_dave, via=hs2.server_name)
    readable = grace.create_room(public=False, invite=[eve.user_id])  # grace, eve
    grace.set_history_visibility(readable, "world_readable")
    eve.join(readable, via=hs2.server_name)
    local = eve.create_room(public=False, invite=[bob.user_id])  # eve, bob (hs1 only)
    bob.join(local)
    remote_only = frank.create_room(public=True)  # frank: no hs1 user
    # Rooms hs1 knows with no local member joined: carol is invited to one and never
    # joins; she joins another and leaves it.
    frank.create_room(public=False, invite=[carol.user_id])
    left = frank.create_room(public=True)
    carol.join(left, via=hs2.server_name)
    carol.leave(left)

    alice.set_room_displayname(public, "Pubby")
    alice.set_room_displayname(with_alice, "Delia")
    dave.set_room_displayname(with_dave, "Dodo")
    bob.set_room_displayname(with_dave, "Bobby")
    grace.set_room_displayname(readable, "Gigi")
    eve.set_room_displayname(local, "Evie")
    frank.set_room_displayname(remote_only, "Franky")
    # What the bootstrap must find: hs1's rooms with a local member joined, their
    # members, and (join rule, history visibility, public).
    members = {
        public: {alice, bob, eve},
        with_alice: {alice, bob},
        with_dave: {dave, bob},
        readable: {grace, eve},
        local: {eve, bob},
    }
    publicity = {
        public: ("public", "shared", True),
        with_alice: ("invite", "shared", False),
        with_dave: ("invite", "shared", False),
        readable: ("invite", "world_readable", True),
        local: ("invite", "shared", False),
    }
    memberships = sum(len(users) for users in members.values())
    # Synapse's own directory finds alice by her per-room name in a public room: the
    # leak the directory exists to fix.
    wait_until(
        lambda: alice.user_id in {r["user_id"] for r in eve.directory_search("pubby")["results"]},
        15,
        what="Synapse's own directory to show alice by her per-room name",
    )
    setup_done = time.monotonic()

    # 2. The directory is installed: registered on hs1 (a restart), our processes
    # started. It has heard of nothing, and the worker says how to load what exists.
    # No event happens on hs1 from here on: a Synapse that never had an appservice
    # sends the first one its whole history with the next event (Synapse 1.163), and
    # the directory must learn what exists from the bootstrap alone.
    deployment = testbed.register(admin)
    registered = time.monotonic()
    wait_until(
        lambda: "the directory knows no room yet" in deployment.processes.log("worker1"),
        15,
        what="the worker's hint that a bootstrap is needed",
    )
    assert count(testbed.engine, rooms) == 0
    assert count(testbed.engine, user_directory) == 0
    assert deployment.names(eve, "alice") == {}

    # 3. The bootstrap: every room hs1 is in (not the invite, not the room carol left,
    # not the remote-only room).
    first = run_bootstrap(testbed, tmp_path, "first")
    summary = SUMMARY.search(first)
    assert summary, first
    loaded = (str(len(members)), str(memberships), "0")
    assert (summary["rooms"], summary["members"], summary["failed"]) == loaded, first
    progress = PROGRESS_LINE.findall(first)
    assert progress, first
    assert progress[-1] == (str(len(members)), *loaded), first
    bootstrapped = time.monotonic()

    # 4. Whom each one finds, once the public profiles are fetched.
    names = {
        alice.user_id: "Alice",
        bob.user_id: "Bob",
        eve.user_id: "Eve",
        dave.user_id: "Dave",
        grace.user_id: "Grace",
    }
    try:
        wait_until(lambda: entries(testbed.engine) == names and settled(testbed.engine), 30)
    except TimeoutError as exc:
        state = database_state(testbed.engine)
        raise AssertionError(f"{exc}: expected {names}, the database holds {state}") from exc
    assert member_pairs(testbed.engine) == {
        (room, user.user_id) for room, users in members.items() for user in users
    }
    assert room_state(testbed.engine) == {
        room: (*values, True) for room, values in publicity.items()
    }

    expected = {
        # eve shares the public room with alice and bob, the world-readable one with
        # grace; dave is only in a private room with bob.
        eve: {"alice": "Alice", "bob": "Bob", "grace": "Grace", "dave": None, "frank": None},
        bob: {"alice": "Alice", "dave": "Dave", "eve": "Eve", "grace": "Grace", "frank": None},
        # carol is in no room: members of public and world-readable rooms only.
        carol: {"alice": "Alice", "bob": "Bob", "eve": "Eve", "grace": "Grace", "dave": None},
        admin: {"alice": "Alice", "grace": "Grace", "dave": None, "frank": None},
    }
    by_localpart = {u.user_id.split(":")[0][1:]: u for u in (alice, bob, eve, dave, frank, grace)}
    for searcher, terms in expected.items():
        for term, name in terms.items():
            found = {} if name is None else {by_localpart[term].user_id: name}
            assert deployment.names(searcher, term) == found, (searcher, term)
    for searcher in (bob, eve, carol, admin):
        for term in PER_ROOM_NAMES:
            assert deployment.names(searcher, term) == {}, (searcher, term)
        assert deployment.names(searcher, frank.user_id) == {}, searcher
    searched = time.monotonic()

    # 5. A second run reads every room again and changes nothing.
    before = database_state(testbed.engine)
    second = run_bootstrap(testbed, tmp_path, "second")
    summary2 = SUMMARY.search(second)
    assert summary2, second
    assert int(summary2["run"]) == int(summary["run"]) + 1, second
    assert (summary2["rooms"], summary2["members"], summary2["failed"]) == loaded, second
    assert f"bootstrap run {summary2['run']} started" in second, second
    wait_until(lambda: settled(testbed.engine), 15, what="the second run to settle")
    after = database_state(testbed.engine)
    for table in before:
        assert after[table] == before[table], table
    assert after["pending_fetches"] == []
    assert entries(testbed.engine) == names
    print(
        f"\ntimings: setup {setup_done - test_started:.1f} s, registration"
        f" {registered - setup_done:.1f} s, first bootstrap {bootstrapped - registered:.1f} s,"
        f" searches {searched - bootstrapped:.1f} s, second bootstrap"
        f" {time.monotonic() - searched:.1f} s"
    )
