"""SQL for processed appservice transaction ids."""

from __future__ import annotations

from sqlalchemy import Connection, delete

from directory.models import appservice_transactions
from directory.storage.common import insert_for


def record(conn: Connection, txn_id: str, now_ms: int, events: int) -> bool:
    """Remember a transaction; False if it was processed before (a replay).

    A concurrent duplicate waits on the first one's row lock and then finds it, so a
    transaction is processed once even when the homeserver retries mid-request.
    """
    inserted = conn.execute(
        insert_for(conn, appservice_transactions)
        .values(txn_id=txn_id, received_at_ms=now_ms, events=events)
        .on_conflict_do_nothing(index_elements=["txn_id"])
        .returning(appservice_transactions.c.txn_id)
    ).first()
    return inserted is not None


def forget_before(conn: Connection, before_ms: int) -> int:
    return conn.execute(
        delete(appservice_transactions).where(appservice_transactions.c.received_at_ms < before_ms)
    ).rowcount
