"""The seed scenario against real Synapse homeservers: our server, worker and beat as
separate processes, registered as an appservice on hs1; remote users on hs2 reached
over real federation. Per-room names must never be shown or found; public names,
global renames, leaves and a dead remote must all converge (docs/design.md §8, scenarios
1, 2, 4, 6, 7, 10)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from directory import jsoncodec
from directory.models import event_inbox, pending_fetches, room_members
from directory.storage import inbox
from tests.e2e.conftest import Deployment
from tests.support.processes import wait_until

pytestmark = pytest.mark.e2e


def member_value(testbed: Deployment, room_id: str, user_id: str) -> str | None:
    """The per-room name our database recorded (private; only a fetch trigger)."""
    with testbed.engine.connect() as conn:
        return conn.scalar(
            select(room_members.c.displayname).where(
                room_members.c.room_id == room_id, room_members.c.user_id == user_id
            )
        )


def pending(testbed: Deployment, user_id: str) -> dict | None:
    with testbed.engine.connect() as conn:
        row = conn.execute(
            select(pending_fetches).where(pending_fetches.c.user_id == user_id)
        ).one_or_none()
    return row._asdict() if row else None


def what_we_hold(testbed: Deployment, user_id: str) -> str:
    """Our side of a failure: is an event still waiting, which rooms hold the user."""
    with testbed.engine.connect() as conn:
        rooms = conn.scalars(
            select(room_members.c.room_id).where(room_members.c.user_id == user_id)
        ).all()
    return f"inbox events {inbox_events(testbed)}, {user_id} in rooms {rooms}"


def inbox_events(testbed: Deployment) -> int:
    with testbed.engine.connect() as conn:
        return inbox.backlog(conn).events


def inbox_holds_name(testbed: Deployment, user_id: str, name: str) -> bool:
    """An accepted, unapplied member event of `user_id` carries `name` (any other
    event waiting, such as a late echo of an earlier rename, does not count)."""
    with testbed.engine.connect() as conn:
        payloads = conn.scalars(
            select(event_inbox.c.payload).where(event_inbox.c.kind == inbox.EVENTS)
        ).all()
    return any(
        event.get("type") == "m.room.member"
        and event.get("state_key") == user_id
        and (event.get("content") or {}).get("displayname") == name
        for payload in payloads
        for event in jsoncodec.unpack(payload)
        if isinstance(event, dict)
    )


def test_per_room_names_never_leak_across_federation(federation: Deployment) -> None:
    hs1, hs2 = federation.hs1, federation.hs2
    assert hs2 is not None
    alice = hs2.register("alice", displayname="Alice")
    bob = hs1.register("bob", displayname="Bob")
    eve = hs1.register("eve", displayname="Eve")

    public = alice.create_room(public=True)
    bob.join(public, via=hs2.server_name)
    eve.join(public, via=hs2.server_name)
    private = alice.create_room(public=False, invite=[bob.user_id])
    bob.join(private, via=hs2.server_name)
    alice.set_room_displayname(private, "Delia")

    # Alice's own join was never sent to us: the backfill of the public room found her.
    federation.wait_for_names(eve, "alice", {alice.user_id: "Alice"})
    wait_until(lambda: member_value(federation, private, alice.user_id) == "Delia", 15)
    wait_until(lambda: pending(federation, alice.user_id) is None, 15)
    assert federation.names(eve, "delia") == {}
    assert federation.names(bob, "delia") == {}
    assert federation.names(eve, alice.user_id) == {alice.user_id: "Alice"}

    # A per-room name in a PUBLIC room: Synapse's own directory shows it; ours must not.
    alice.set_room_displayname(public, "Pubby")
    wait_until(
        lambda: any(
            r["user_id"] == alice.user_id for r in eve.directory_search("pubby")["results"]
        ),
        30,
        what="Synapse's own directory to show the per-room name (the leak we fix)",
    )
    wait_until(lambda: member_value(federation, public, alice.user_id) == "Pubby", 15)
    wait_until(lambda: pending(federation, alice.user_id) is None, 15)
    assert federation.names(eve, "pubby") == {}
    assert federation.names(eve, "alice") == {alice.user_id: "Alice"}

    # A global rename reaches us (echoed into both rooms, fetched once).
    alice.set_displayname("Alicia")
    federation.wait_for_names(eve, "alicia", {alice.user_id: "Alicia"})
    assert federation.names(bob, "delia") == {}

    # With no worker running, the rename is accepted (durable in the inbox) but not
    # applied; hs2 then dies, and the next worker applies it and fails to fetch: it
    # backs off, then converges once hs2 returns.
    federation.processes.kill("worker1")
    alice.set_displayname("Alicia Again")
    # The rename itself: an echo of the previous one may still arrive after the kill.
    wait_until(
        lambda: inbox_holds_name(federation, alice.user_id, "Alicia Again"),
        30,
        what="the rename accepted",
    )
    assert pending(federation, alice.user_id) is None  # nobody applied it yet
    hs2.kill()
    federation.processes.start_worker("worker2")
    wait_until(lambda: pending(federation, alice.user_id) is not None, 60, what="the trigger")
    wait_until(
        lambda: (pending(federation, alice.user_id) or {}).get("attempts", 0) >= 2,
        30,
        what="failed attempts while hs2 is down",
    )
    assert federation.names(eve, "alicia") == {alice.user_id: "Alicia"}  # as it was
    hs2.start()
    federation.wait_for_names(eve, "again", {alice.user_id: "Alicia Again"}, timeout=60)

    # Leaving every room we share removes her.
    alice.leave(public)
    alice.leave(private)
    federation.wait_for_names(eve, "alice", {})
    try:
        # Longer: after hs2's restart its federation traffic to hs1 can lag.
        federation.wait_for_names(bob, "alice", {}, timeout=90)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; {what_we_hold(federation, alice.user_id)}") from exc


def test_local_per_room_names_and_private_rooms_on_one_homeserver(single: Deployment) -> None:
    hs = single.hs1
    bob = hs.register("bob", displayname="Bob")
    eve = hs.register("eve", displayname="Eve")
    carol = hs.register("carol", displayname="Carol")
    dave = hs.register("dave", displayname="Dave")

    shared = bob.create_room(public=False, invite=[eve.user_id])
    eve.join(shared)
    bob.set_room_displayname(shared, "Bobby")
    hidden = dave.create_room(public=False, invite=[bob.user_id])
    bob.join(hidden)
    carol.create_room(public=False)  # carol shares no room with anyone

    single.wait_for_names(eve, "bob", {bob.user_id: "Bob"})
    single.wait_for_names(bob, "dave", {dave.user_id: "Dave"})
    wait_until(lambda: member_value(single, shared, bob.user_id) == "Bobby", 15)
    wait_until(lambda: pending(single, bob.user_id) is None, 15)
    for searcher in (bob, eve, carol):
        assert single.names(searcher, "bobby") == {}
    assert single.names(carol, "bob") == {}
    assert single.names(eve, "dave") == {}
    assert single.names(carol, "dave") == {}

    # Visibility follows the room's publicity, both ways.
    bob.set_join_rule(shared, "public")
    single.wait_for_names(carol, "bob", {bob.user_id: "Bob"})
    bob.set_join_rule(shared, "invite")
    single.wait_for_names(carol, "bob", {})
    time.sleep(0.5)
    assert single.names(eve, "bob") == {bob.user_id: "Bob"}
