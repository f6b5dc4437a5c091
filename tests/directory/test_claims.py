"""Claims take at most what they ask for, whatever the planner knows: a fetch run or a
bootstrap loader that took every due row would hold them all under one lease while
the others idle (seen in the bootstrap benchmark on a freshly loaded, un-analysed
table)."""

from __future__ import annotations

from sqlalchemy import Engine

from directory.clock import now_ms
from directory.dedup import UNSEEN
from directory.storage import bootstrap as bootstrap_store
from directory.storage import entries, pending

MANY = 3_000


def test_a_bootstrap_claim_takes_at_most_its_limit(db: Engine) -> None:
    now = now_ms()
    with db.begin() as conn:
        run_id = bootstrap_store.create_run(conn, "admin", now)
        bootstrap_store.add_rooms(conn, run_id, [(f"!r{i}:x", None) for i in range(MANY)], now)
    with db.begin() as conn:
        first = bootstrap_store.claim_rooms(conn, run_id, now, now + 60_000, 5)
    with db.begin() as conn:
        second = bootstrap_store.claim_rooms(conn, run_id, now, now + 60_000, 5)
    assert len(first) == len(second) == 5
    assert not {r.room_id for r in first} & {r.room_id for r in second}


def test_a_fetch_claim_takes_at_most_its_limit(db: Engine) -> None:
    now = now_ms()
    users = [f"@u{i}:remote.test" for i in range(MANY)]
    with db.begin() as conn:
        entries.create_placeholders(conn, dict.fromkeys(users, UNSEEN), now, now)
        pending.queue(conn, users, "first", now)
    with db.begin() as conn:
        claims = pending.claim(conn, "remote.test", now, now + 60_000, 25)
    assert len(claims) == 25
