"""Beat's jobs with real processes: profiles older than PROFILE_MAX_AGE are refreshed
with no event at all, orphaned entries are pruned, and two beats never both send."""

from __future__ import annotations

import re
import time

from sqlalchemy import Engine, insert

from directory.clock import now_ms
from directory.models import user_directory
from directory.text import entry_keys
from tasks.ingest import ingest_events
from tests.conftest import SERVER_NAME
from tests.support.events import member
from tests.support.fake_homeserver import FakeHomeserver, Hang, Reply
from tests.support.processes import ProcessGroup, wait_until
from tests.tasks.conftest import entry, wait_for_name

ALICE = "@alice:remote.test"
BOB = f"@bob:{SERVER_NAME}"


def test_old_profiles_are_refreshed_without_any_event(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    processes.env.update(PROFILE_MAX_AGE="2", REFRESH_INTERVAL_SECONDS="0.5")
    homeserver.set_profile(ALICE, "Alice")
    processes.start_worker()
    processes.start_beat()
    ingest_events([member("!r:x", BOB), member("!r:x", ALICE)])
    wait_for_name(db, ALICE, "Alice")
    homeserver.set_profile(ALICE, "Alicia")  # changed while no event reached us
    wait_for_name(db, ALICE, "Alicia", timeout=15)


def test_a_trigger_during_a_fetch_in_flight_causes_one_more_fetch(
    db: Engine, processes: ProcessGroup, homeserver: FakeHomeserver
) -> None:
    """The answer in flight predates the change, so it must not close the matter."""
    processes.env.update(FETCH_READ_TIMEOUT_SECONDS="5")
    homeserver.set_profile(ALICE, "Alicia")
    homeserver.script(ALICE, Hang(1.5, then=Reply(200, {"displayname": "Alice"})))
    processes.start_worker()
    ingest_events([member("!r:x", BOB), member("!r:x", ALICE, displayname="Alice")])
    wait_until(lambda: homeserver.count(ALICE) == 1, 10, what="the first fetch")
    ingest_events([member("!r:x", ALICE, displayname="Alicia")])
    wait_for_name(db, ALICE, "Alicia", timeout=15)
    time.sleep(1)
    assert homeserver.count(ALICE) == 2


def test_entries_of_users_in_no_visible_room_are_pruned(
    db: Engine, processes: ProcessGroup
) -> None:
    processes.env.update(PRUNE_INTERVAL_SECONDS="0.5")
    ingest_events([member("!r:x", BOB)])
    with db.begin() as conn:  # an entry the hooks would never leave behind
        conn.execute(
            insert(user_directory).values(
                user_id=ALICE,
                server_name="remote.test",
                refresh_due_ms=now_ms() + 60_000,
                created_at_ms=now_ms(),
                **entry_keys(ALICE, None),
            )
        )
    processes.start_worker()
    processes.start_beat()
    wait_until(lambda: entry(db, ALICE) is None, 15, what="the orphan to be pruned")
    assert entry(db, BOB) is not None


def test_a_second_beat_waits_instead_of_sending_twice(db: Engine, processes: ProcessGroup) -> None:
    processes.env.update(RECONCILE_INTERVAL_SECONDS="0.5")
    processes.start_beat("beat1")
    processes.start_beat("beat2")
    time.sleep(4)

    def sent(name: str) -> int:
        return len(re.findall(r"Sending due task reconcile", processes.log(name)))

    counts = sorted([sent("beat1"), sent("beat2")])
    assert counts[0] == 0 and counts[1] >= 4, counts
    leader = "beat1" if sent("beat1") else "beat2"
    processes.kill(leader)  # SIGKILL: the lock is not released, it must expire
    standby = "beat2" if leader == "beat1" else "beat1"
    wait_until(lambda: sent(standby) > 0, 45, what="the standby beat to take over")
