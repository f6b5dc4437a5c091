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


@dataclass(frozen=True)
class RoomStateEvent:
    room_id: str
    join_rule: str | None = None
    history_visibility: str | None = None


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


def _short_string(content: dict[str, Any], key: str) -> str | None:
    value = content.get(key)
    if not isinstance(value, str) or len(value) > 64 or has_control_characters(value):
        raise InvalidEvent(f"content.{key} is not a short string")
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
    if event_type == "m.room.join_rules" and event.get("state_key") == "":
        return RoomStateEvent(
            _room_id(event), join_rule=_short_string(_content(event), "join_rule")
        )
    if event_type == "m.room.history_visibility" and event.get("state_key") == "":
        return RoomStateEvent(
            _room_id(event),
            history_visibility=_short_string(_content(event), "history_visibility"),
        )
    return None


def is_public(join_rule: str | None, history_visibility: str | None) -> bool:
    """The spec's rule: anyone may find the members of a public or world-readable room."""
    return join_rule == "public" or history_visibility == "world_readable"
