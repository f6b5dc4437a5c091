"""The rooms of a generated homeserver, for the bootstrap measurement.

The fake homeserver serves them through Synapse's admin API (the room list and each
room's current state); the harness replays the same rooms as appservice events for
the live baseline, and checks what the bootstrap loaded against them. Like profiles
(bench/population.py), everything derives from the spec and the room's index, so the
two processes agree without shipping 500,000 memberships from one to the other.

Each room has `members` joined members: one or two local users of LOCAL_SERVER (the
room's creator first), the rest remote users of the population (many servers, Zipf
sizes). Most members' events carry their public profile, as a join does; some carry a
per-room nickname, which must never reach the directory (each has ROOM_NICK_MARKER in
it, so a check finds any that did).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from bench.population import LOCAL_SERVER, make_population, public_profile

ROOM_NICK_MARKER = "roomnick"
# Shares of rooms and members (seeded, so the same on every run and in every process).
PUBLIC_SHARE = 0.3
WORLD_READABLE_SHARE = 0.05
SECOND_LOCAL_SHARE = 0.3
ROOM_NICK_SHARE = 0.15
ROOM_VERSION = "10"
BASE_TS = 1_750_000_000_000


@dataclass(frozen=True)
class RoomSpec:
    rooms: int
    members: int
    users: int
    servers: int
    seed: int = 23

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoomSpec:
        return cls(**{k: int(data[k]) for k in ("rooms", "members", "users", "servers", "seed")})


@dataclass(frozen=True)
class Member:
    user_id: str
    displayname: str | None
    avatar_url: str | None


@dataclass(frozen=True)
class Room:
    index: int
    room_id: str
    creator: str
    public: bool
    world_readable: bool
    locals: int  # the first `locals` members are local
    members: list[Member]

    @property
    def join_rule(self) -> str:
        return "public" if self.public else "invite"

    @property
    def history_visibility(self) -> str:
        return "world_readable" if self.world_readable else "shared"


class GeneratedRooms:
    def __init__(self, spec: RoomSpec) -> None:
        if spec.members < 2:
            raise ValueError("a generated room has at least 2 members")
        if spec.users < spec.members:
            raise ValueError("the population must be larger than a room")
        self.spec = spec
        self.population = make_population(spec.users, spec.servers, seed=spec.seed)
        self.local_users = [
            f"@local{i:05d}:{LOCAL_SERVER}" for i in range(max(10, spec.rooms // 10))
        ]
        self._profiles: dict[str, dict[str, str]] = {}

    # -- ids -------------------------------------------------------------------

    @staticmethod
    def room_id(index: int) -> str:
        return f"!boot{index:07d}:{LOCAL_SERVER}"

    def index_of(self, room_id: str) -> int | None:
        if not (room_id.startswith("!boot") and room_id.endswith(":" + LOCAL_SERVER)):
            return None
        digits = room_id[5 : -len(LOCAL_SERVER) - 1]
        if not digits.isdigit():
            return None
        index = int(digits)
        return index if index < self.spec.rooms else None

    # -- rooms -----------------------------------------------------------------

    def _rng(self, index: int) -> random.Random:
        return random.Random(self.spec.seed * 1_000_003 + index)

    def _header(self, index: int, rng: random.Random) -> tuple[list[str], bool, bool]:
        locals_ = 2 if rng.random() < SECOND_LOCAL_SHARE else 1
        local = rng.sample(self.local_users, locals_)
        return local, rng.random() < PUBLIC_SHARE, rng.random() < WORLD_READABLE_SHARE

    def summary(self, index: int) -> tuple[int, bool, bool, str]:
        """(local members, public, world readable, creator), without the members."""
        local, public, world = self._header(index, self._rng(index))
        return len(local), public, world, local[0]

    def _profile(self, user_id: str) -> dict[str, str]:
        profile = self._profiles.get(user_id)
        if profile is None:
            profile = self._profiles[user_id] = public_profile(user_id)
        return profile

    def room(self, index: int) -> Room:
        rng = self._rng(index)
        local, public, world = self._header(index, rng)
        remote = rng.sample(self.population.users, self.spec.members - len(local))
        members = [Member(user, user.split(":", 1)[0][1:], None) for user in local]
        for user in remote:
            profile = self._profile(user)
            name = profile["displayname"]
            if rng.random() < ROOM_NICK_SHARE:
                name = f"{name.split(' ', 1)[0]} ({ROOM_NICK_MARKER} {index})"
            members.append(Member(user, name, profile["avatar_url"]))
        return Room(index, self.room_id(index), local[0], public, world, len(local), members)

    # -- as Synapse's admin API shows them ------------------------------------

    def list_entry(self, index: int) -> dict[str, Any]:
        """One room of GET /_synapse/admin/v1/rooms."""
        locals_, public, world, creator = self.summary(index)
        return {
            "room_id": self.room_id(index),
            "name": f"Room {index}",
            "canonical_alias": None,
            "joined_members": self.spec.members,
            "joined_local_members": locals_,
            "version": ROOM_VERSION,
            "creator": creator,
            "encryption": None,
            "federatable": True,
            "public": public,
            "join_rules": "public" if public else "invite",
            "guest_access": None,
            "history_visibility": "world_readable" if world else "shared",
            "state_events": self.spec.members + 5,
            "room_type": None,
        }

    def state_events(self, index: int) -> list[dict[str, Any]]:
        """GET /_synapse/admin/v1/rooms/{roomId}/state's "state": the room's current
        state events as Synapse serialises them for clients."""
        room = self.room(index)
        room_id, creator = room.room_id, room.creator
        ts = BASE_TS + index * 1000
        events: list[dict[str, Any]] = []

        def add(event_type: str, state_key: str, sender: str, content: dict[str, Any]) -> None:
            n = len(events)
            events.append(
                {
                    "type": event_type,
                    "room_id": room_id,
                    "sender": sender,
                    "content": content,
                    "state_key": state_key,
                    "origin_server_ts": ts + n,
                    "unsigned": {"age": 86_400_000 - n},
                    "event_id": f"$b{index:07d}e{n:05d}x0123456789abcdefghijklmnopq",
                    "user_id": sender,
                    "age": 86_400_000 - n,
                }
            )

        add("m.room.create", "", creator, {"creator": creator, "room_version": ROOM_VERSION})
        add(
            "m.room.power_levels",
            "",
            creator,
            {"users": {creator: 100}, "users_default": 0, "events_default": 0},
        )
        add("m.room.join_rules", "", creator, {"join_rule": room.join_rule})
        add(
            "m.room.history_visibility",
            "",
            creator,
            {"history_visibility": room.history_visibility},
        )
        add("m.room.name", "", creator, {"name": f"Room {index}"})
        for member in room.members:
            content: dict[str, Any] = {"membership": "join"}
            if member.displayname is not None:
                content["displayname"] = member.displayname
            if member.avatar_url is not None:
                content["avatar_url"] = member.avatar_url
            add("m.room.member", member.user_id, member.user_id, content)
        return events
