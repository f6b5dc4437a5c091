"""Applying the inbox: accepted transactions are applied in order, and an event the
database refuses is skipped alone, without holding up its batch or anything behind it
(bad input loses nothing else)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select, text

from directory.config import Settings
from directory.ingest import accept_transaction, apply_accepted
from directory.membership import BatchOutcome
from directory.models import room_members
from directory.storage import inbox
from directory.storage.common import is_postgresql
from tests.conftest import SERVER_NAME
from tests.support.events import member
from tests.support.state import entry_ids

BOB = f"@bob:{SERVER_NAME}"
ALICE = "@alice:remote.test"
CAROL = "@carol:remote.test"
DAVE = "@dave:other.test"
# Valid in every way; the test database refuses to store it, standing in for any
# event our code or the database cannot apply.
POISON = "@poison:remote.test"

_POSTGRESQL_REFUSAL = [
    """CREATE FUNCTION refuse_poison() RETURNS trigger AS $$
    BEGIN
        IF NEW.user_id = '@poison:remote.test' THEN
            RAISE EXCEPTION 'refusing %', NEW.user_id;
        END IF;
        RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON room_members
    FOR EACH ROW EXECUTE FUNCTION refuse_poison()""",
]
_POSTGRESQL_UNDO = [
    "DROP TRIGGER refuse_poison ON room_members",
    "DROP FUNCTION refuse_poison()",
]
_SQLITE_REFUSAL = [
    """CREATE TRIGGER refuse_poison BEFORE INSERT ON room_members
    WHEN NEW.user_id = '@poison:remote.test'
    BEGIN SELECT RAISE(ABORT, 'refusing the poison user'); END""",
]
_SQLITE_UNDO = ["DROP TRIGGER refuse_poison"]


@pytest.fixture
def refusing_db(db: Engine) -> Iterator[Engine]:
    postgresql = is_postgresql(db)
    with db.begin() as conn:
        for statement in _POSTGRESQL_REFUSAL if postgresql else _SQLITE_REFUSAL:
            conn.execute(text(statement))
    yield db
    with db.begin() as conn:
        for statement in _POSTGRESQL_UNDO if postgresql else _SQLITE_UNDO:
            conn.execute(text(statement))


def apply_all(engine: Engine, settings: Settings) -> tuple[int, BatchOutcome]:
    """Apply until the inbox is empty: how many transactions, and what was published."""
    published = BatchOutcome()
    transactions = 0
    while True:
        applied = apply_accepted(engine, settings, published.merge)
        transactions += applied.transactions
        if not applied.more:
            return transactions, published


def members(engine: Engine) -> set[tuple[str, str]]:
    with engine.connect() as conn:
        return {(r.room_id, r.user_id) for r in conn.execute(select(room_members))}


def test_transactions_apply_together_and_in_order(db: Engine, settings: Settings) -> None:
    accept_transaction(db, [member("!r:x", BOB), member("!r:x", ALICE)], "t1")
    accept_transaction(db, [member("!r:x", ALICE, membership="leave")], "t2")
    accept_transaction(db, [member("!r:x", CAROL)], "t3")
    assert not accept_transaction(db, [member("!r:x", DAVE)], "t3")

    transactions, outcome = apply_all(db, settings)

    assert transactions == 3 and outcome.events == 4 and outcome.invalid == 0
    assert members(db) == {("!r:x", BOB), ("!r:x", CAROL)}
    assert entry_ids(db) == {BOB, CAROL}


def test_an_event_the_database_refuses_is_skipped_and_the_rest_applied_in_order(
    refusing_db: Engine, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    db = refusing_db
    accept_transaction(db, [member("!r:x", BOB), member("!r:x", ALICE)], "t1")
    accept_transaction(db, [member("!r:x", POISON), member("!r:x", CAROL)], "t2")
    # Order still holds after the failure: Alice's leave comes after her join.
    accept_transaction(db, [member("!r:x", ALICE, membership="leave"), member("!s:x", DAVE)], "t3")
    accept_transaction(db, [member("!s:x", BOB)], "t4")

    with caplog.at_level(logging.ERROR, logger="directory.ingest"):
        transactions, outcome = apply_all(db, settings)

    assert transactions == 4
    assert outcome.events == 7 and outcome.invalid == 1
    assert members(db) == {("!r:x", BOB), ("!r:x", CAROL), ("!s:x", DAVE), ("!s:x", BOB)}
    assert entry_ids(db) == {BOB, CAROL, DAVE}
    with db.connect() as conn:
        assert inbox.backlog(conn).transactions == 0
    skipped = [r for r in caplog.records if "cannot be applied" in r.getMessage()]
    assert len(skipped) == 1 and POISON in skipped[0].getMessage()
