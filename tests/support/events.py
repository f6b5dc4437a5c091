"""Builders for the raw events a homeserver sends, shaped as Synapse sends them."""

from __future__ import annotations

import itertools
from typing import Any

_ids = itertools.count(1)


def member(
    room_id: str,
    user_id: str,
    membership: str = "join",
    displayname: str | None = None,
    avatar_url: str | None = None,
) -> dict[str, Any]:
    content: dict[str, Any] = {"membership": membership}
    if displayname is not None:
        content["displayname"] = displayname
    if avatar_url is not None:
        content["avatar_url"] = avatar_url
    return {
        "type": "m.room.member",
        "room_id": room_id,
        "sender": user_id,
        "state_key": user_id,
        "event_id": f"$event{next(_ids)}",
        "origin_server_ts": 1_700_000_000_000,
        "content": content,
    }


def join_rules(room_id: str, rule: str) -> dict[str, Any]:
    return {
        "type": "m.room.join_rules",
        "room_id": room_id,
        "state_key": "",
        "sender": "@admin:ours.test",
        "event_id": f"$event{next(_ids)}",
        "content": {"join_rule": rule},
    }


def history_visibility(room_id: str, visibility: str) -> dict[str, Any]:
    return {
        "type": "m.room.history_visibility",
        "room_id": room_id,
        "state_key": "",
        "sender": "@admin:ours.test",
        "event_id": f"$event{next(_ids)}",
        "content": {"history_visibility": visibility},
    }
