"""Matrix events as a homeserver sends them to an appservice, and the ingest mix.

Events carry what Synapse puts in them (event_id, sender, origin_server_ts, unsigned
with prev_content and age), so the bodies the server parses are realistic in size.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.population import LOCAL_SERVER, Population, public_profile

_event_ids = itertools.count()


def _event_id() -> str:
    return f"$bench{next(_event_ids):010d}:{LOCAL_SERVER}"


def member_event(
    room_id: str,
    user_id: str,
    membership: str,
    displayname: str | None = None,
    avatar_url: str | None = None,
    prev: dict[str, Any] | None = None,
    ts: int = 1_800_000_000_000,
) -> dict[str, Any]:
    content: dict[str, Any] = {"membership": membership}
    if displayname is not None:
        content["displayname"] = displayname
    if avatar_url is not None:
        content["avatar_url"] = avatar_url
    event: dict[str, Any] = {
        "type": "m.room.member",
        "state_key": user_id,
        "sender": user_id,
        "room_id": room_id,
        "event_id": _event_id(),
        "origin_server_ts": ts,
        "content": content,
        "unsigned": {"age": 120},
    }
    if prev is not None:
        event["unsigned"]["prev_content"] = prev
        event["prev_content"] = prev  # Synapse also sends it at the top level
    return event


def state_event(
    room_id: str, sender: str, event_type: str, content: dict[str, Any]
) -> dict[str, Any]:
    return {
        "type": event_type,
        "state_key": "",
        "sender": sender,
        "room_id": room_id,
        "event_id": _event_id(),
        "origin_server_ts": 1_800_000_000_000,
        "content": content,
        "unsigned": {"age": 120},
    }


def room_setup(
    room_id: str, local_user: str, public: bool, world_readable: bool = False
) -> list[dict[str, Any]]:
    """A local user creates/joins a room (making it visible to us) and its rules."""
    return [
        member_event(room_id, local_user, "join", local_user.split(":")[0][1:]),
        state_event(
            room_id,
            local_user,
            "m.room.join_rules",
            {"join_rule": "public" if public else "invite"},
        ),
        state_event(
            room_id,
            local_user,
            "m.room.history_visibility",
            {"history_visibility": "world_readable" if world_readable else "shared"},
        ),
    ]


def transactions(events: list[dict[str, Any]], size: int) -> list[bytes]:
    """JSON bodies of appservice transactions, encoded up front: a homeserver has its
    body ready, and the benchmark must not time its own encoder."""
    return [
        json.dumps({"events": events[i : i + size]}).encode() for i in range(0, len(events), size)
    ]


@dataclass
class IngestMix:
    """The ingest stream: rooms set up, then joins, leaves, per-room and global renames
    and join-rule changes in roughly the proportions a busy server sees."""

    events: list[dict[str, Any]] = field(default_factory=list)
    kind_of: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> Counter[str]:
        return Counter(self.kind_of)

    def member_rows(self) -> list[tuple[str, str, str, str | None, str | None]]:
        """The membership rows these events describe, for the INSERT baseline."""
        rows = []
        for e in self.events:
            if e["type"] == "m.room.member":
                c = e["content"]
                rows.append(
                    (
                        e["room_id"],
                        e["state_key"],
                        c["membership"],
                        c.get("displayname"),
                        c.get("avatar_url"),
                    )
                )
        return rows


def ingest_mix(
    total: int, population: Population, rooms: int, locals_: int, seed: int = 7
) -> IngestMix:
    rng = random.Random(seed)
    mix = IngestMix()
    room_ids = [f"!room{i:05d}:{LOCAL_SERVER}" for i in range(rooms)]
    local_users = [f"@local{i:04d}:{LOCAL_SERVER}" for i in range(locals_)]
    public = {r: rng.random() < 0.3 for r in room_ids}
    creator = {r: local_users[i % len(local_users)] for i, r in enumerate(room_ids)}

    def add(event: dict[str, Any], kind: str) -> None:
        mix.events.append(event)
        mix.kind_of.append(kind)

    for room in room_ids:
        for event in room_setup(room, creator[room], public[room], rng.random() < 0.05):
            add(event, "room setup")

    # Room popularity is skewed: a few rooms hold thousands, most a handful.
    weights = [1 / (rank + 1) ** 0.8 for rank in range(rooms)]
    users = population.users
    names: dict[str, dict[str, str]] = {}
    user_rooms: dict[str, list[str]] = {}
    memberships: list[tuple[str, str]] = []  # (room, user), for picking a leave
    where: dict[tuple[str, str], int] = {}

    def profile_of(user: str) -> dict[str, str]:
        return names.setdefault(user, public_profile(user))

    def join(user: str, room: str) -> None:
        p = profile_of(user)
        add(member_event(room, user, "join", p["displayname"], p["avatar_url"]), "join")
        user_rooms.setdefault(user, []).append(room)
        where[(room, user)] = len(memberships)
        memberships.append((room, user))

    def leave(room: str, user: str) -> None:
        p = profile_of(user)
        add(member_event(room, user, "leave", prev={"membership": "join", **p}), "leave")
        user_rooms[user].remove(room)
        index = where.pop((room, user))
        last = memberships.pop()
        if index < len(memberships):
            memberships[index] = last
            where[last] = index

    operations = ["join", "leave", "room rename", "global rename", "join rule", "local join"]
    op_weights = [0.62, 0.12, 0.08, 0.045, 0.01, 0.015]
    renames = 0
    while len(mix.events) < total:
        op = rng.choices(operations, op_weights)[0]
        if op == "join" or not memberships:
            user = users[rng.randrange(len(users))]
            room = rng.choices(room_ids, weights)[0]
            if (room, user) not in where:
                join(user, room)
        elif op == "leave":
            room, user = memberships[rng.randrange(len(memberships))]
            leave(room, user)
        elif op == "room rename":
            # A per-room nickname: one room only, never the public profile.
            room, user = memberships[rng.randrange(len(memberships))]
            p = profile_of(user)
            add(
                member_event(
                    room,
                    user,
                    "join",
                    f"{p['displayname']} (in {room[5:10]})",
                    p["avatar_url"],
                    {"membership": "join", **p},
                ),
                "per-room rename",
            )
        elif op == "global rename":
            # A global change, echoed into every room the user is in.
            room, user = memberships[rng.randrange(len(memberships))]
            old = profile_of(user)
            renames += 1
            new = {**old, "displayname": f"{old['displayname']} {renames}"}
            names[user] = new
            for r in user_rooms[user]:
                add(
                    member_event(
                        r,
                        user,
                        "join",
                        new["displayname"],
                        new["avatar_url"],
                        {"membership": "join", **old},
                    ),
                    "global rename echo",
                )
        elif op == "join rule":
            room = room_ids[rng.randrange(rooms)]
            public[room] = not public[room]
            add(
                state_event(
                    room,
                    creator[room],
                    "m.room.join_rules",
                    {"join_rule": "public" if public[room] else "invite"},
                ),
                "join rule change",
            )
        else:
            room = room_ids[rng.randrange(rooms)]
            user = local_users[rng.randrange(len(local_users))]
            if (room, user) not in where:
                add(member_event(room, user, "join", user.split(":")[0][1:]), "local join")
                where[(room, user)] = len(memberships)
                memberships.append((room, user))
                user_rooms.setdefault(user, []).append(room)
    del mix.events[total:]
    del mix.kind_of[total:]
    return mix
