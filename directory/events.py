"""Turning raw Matrix events into the few facts the directory cares about.

Anything malformed raises InvalidEvent, so the caller can skip that one event and keep
the rest of its batch. Event types we do not use parse to None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from directory.text import clean_avatar_url, clean_displayname, has_control_characters

MEMBERSHIPS = frozenset({"join", "invite", "leave", "ban", "knock"})
MAX_ID_LENGTH = 255
# Grammar from the spec's identifier appendix, loosely: sigil, something, ':', server.
_USER_ID = re.compile(r"^@[^:\s]+:[^\s/]+$")
_ROOM_ID = re.compile(r"^![^\s]+$")


class InvalidEvent(ValueError):
    """An event we cannot use; the message says why."""


@dataclass(frozen=True)
class ProfileValue:
    """What a member event (or a profile lookup) says about a user's name and avatar."""

    displayname: str | None
    avatar_url: str | None


@dataclass(frozen=True)
class MemberEvent:
    room_id: str
    user_id: str
    membership: str
    # Only a trigger for a fetch: it may be a per-room value and never reaches the directory.
    value: ProfileValue

    @property
    def server_name(self) -> str:
        return server_name_of(self.user_id)


# The state events that decide whether a room is public, by the content key they carry.
PUBLICITY_KEYS = {
    "m.room.join_rules": "join_rule",
    "m.room.history_visibility": "history_visibility",
}


@dataclass(frozen=True)
class RoomStateEvent:
    """A room's join rule or history visibility changed. `value` is None when the
    event's content does not hold a usable one: the room then counts as not public
    (fail closed), never as keeping its old value."""

    room_id: str
    key: str  # "join_rule" or "history_visibility"
    value: str | None


def server_name_of(user_id: str) -> str:
    return user_id.split(":", 1)[1]


def is_valid_user_id(user_id: object) -> bool:
    return (
        isinstance(user_id, str)
        and len(user_id) <= MAX_ID_LENGTH
        and _USER_ID.match(user_id) is not None
        and not has_control_characters(user_id)
    )


def _room_id(event: dict[str, Any]) -> str:
    room_id = event.get("room_id")
    if (
        not isinstance(room_id, str)
        or len(room_id) > MAX_ID_LENGTH
        or not _ROOM_ID.match(room_id)
        or has_control_characters(room_id)
    ):
        raise InvalidEvent(f"bad room_id {room_id!r:.80}")
    return room_id


def _content(event: dict[str, Any]) -> dict[str, Any]:
    content = event.get("content")
    if not isinstance(content, dict):
        raise InvalidEvent("content is not an object")
    return content


def publicity_value(content: object, key: str) -> str | None:
    """A join rule or history visibility from an event's content, or None when it is
    missing or malformed."""
    value = content.get(key) if isinstance(content, dict) else None
    if not isinstance(value, str) or len(value) > 64 or has_control_characters(value):
        return None
    return value


def parse_event(event: object) -> MemberEvent | RoomStateEvent | None:
    if not isinstance(event, dict):
        raise InvalidEvent("event is not an object")
    event_type = event.get("type")
    if not isinstance(event_type, str):
        raise InvalidEvent("event has no type")
    if event_type == "m.room.member":
        user_id = event.get("state_key")
        if not is_valid_user_id(user_id):
            raise InvalidEvent(f"bad state_key {user_id!r:.80}")
        content = _content(event)
        membership = content.get("membership")
        if membership not in MEMBERSHIPS:
            raise InvalidEvent(f"bad membership {membership!r:.40}")
        return MemberEvent(
            room_id=_room_id(event),
            user_id=user_id,
            membership=membership,
            value=ProfileValue(
                displayname=clean_displayname(content.get("displayname")),
                avatar_url=clean_avatar_url(content.get("avatar_url")),
            ),
        )
    key = PUBLICITY_KEYS.get(event_type)
    if key is not None and event.get("state_key") == "":
        return RoomStateEvent(_room_id(event), key, publicity_value(event.get("content"), key))
    return None


def is_public(join_rule: str | None, history_visibility: str | None) -> bool:
    """The spec's rule: anyone may find the members of a public or world-readable room."""
    return join_rule == "public" or history_visibility == "world_readable"
