"""A changed listing configuration reaches the entries already held, with real worker
and beat processes: a starting worker judges every entry again, and beat does every
LISTING_SWEEP_INTERVAL_SECONDS (directory/listing.py)."""

from __future__ import annotations

from sqlalchemy import Engine

from directory.clock import now_ms
from directory.config import Settings
from directory.dedup import UNSEEN
from directory.ingest import ingest_events
from directory.storage import entries
from tests.conftest import SERVER_NAME
from tests.support.events import member
from tests.support.processes import ProcessGroup, wait_until
from tests.tasks.conftest import entry

BOB = f"@bob:{SERVER_NAME}"
SPAM = ["@spam1:spam.example", "@spam2:spam.example", "@spam3:spam.example"]
ROOM = "!r:remote.test"


def unlisted(engine: Engine, user_id: str) -> bool:
    found = entry(engine, user_id)
    return found is not None and not found["listed"] and found["unlisted_reason"] == "excluded"


def test_a_starting_worker_applies_a_changed_configuration_to_every_entry(
    db: Engine, processes: ProcessGroup, pipeline_settings: Settings
) -> None:
    # Held under the old configuration: listed.
    ingest_events(
        db,
        pipeline_settings,
        [member(ROOM, BOB), *(member(ROOM, u) for u in SPAM)],
        lambda _outcome: None,
    )
    assert all(entry(db, u)["listed"] for u in SPAM)

    processes.env.update(EXCLUDE_USER_REGEXES="@.*:spam\\.example")
    processes.start_worker()

    wait_until(lambda: all(unlisted(db, u) for u in SPAM), 20, what="the start sweep")
    assert entry(db, BOB)["listed"]


def test_beat_applies_the_rules_to_entries_written_without_them(
    db: Engine, processes: ProcessGroup
) -> None:
    processes.env.update(
        EXCLUDE_USER_REGEXES="@.*:spam\\.example", LISTING_SWEEP_INTERVAL_SECONDS="0.5"
    )
    processes.start_worker()

    def start_sweep_done() -> bool:
        log = processes.log("worker1")
        return any(
            "apply_listing_rules" in line and "succeeded" in line for line in log.splitlines()
        )

    wait_until(start_sweep_done, 20, what="the worker's start sweep")
    # An entry written by a process with another configuration, after the worker's
    # start sweep: only the schedule can repair it.
    now = now_ms()
    with db.begin() as conn:
        entries.create_placeholders(conn, {SPAM[0]: UNSEEN}, now, now + 3_600_000)
    assert entry(db, SPAM[0])["listed"]
    processes.start_beat()

    wait_until(lambda: unlisted(db, SPAM[0]), 20, what="beat's listing sweep")
