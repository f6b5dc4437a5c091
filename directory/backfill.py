"""Loading a room's existing members when our server joins it.

The homeserver does not replay the members already in a room when a local user joins,
so we read the room's current members and publicity through the client API, acting as
that local user, and feed them through the same hooks as any event: their (possibly
per-room) names are only triggers. Members we knew of who are no longer joined leave.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass

import httpx
from sqlalchemy import Connection

from directory.config import Settings
from directory.events import ProfileValue, is_valid_user_id
from directory.membership import BatchOutcome, process_events
from directory.storage import rooms as room_store
from directory.text import clean_avatar_url, clean_displayname

logger = logging.getLogger(__name__)

# A room's member list can be large (tens of thousands); anything beyond this is hostile.
MAX_MEMBERS_BYTES = 64 * 1024 * 1024


class RoomUnreadable(Exception):
    """The homeserver will not show this room to that user (left, or never joined)."""


class HomeserverUnavailable(Exception):
    """A failure worth retrying: connection, timeout, 5xx, 429."""


@dataclass(frozen=True)
class RoomSnapshot:
    joined: dict[str, ProfileValue]
    join_rule: str | None
    history_visibility: str | None


class RoomReader:
    """Reads a room's current state through our homeserver's client API."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        self.client = httpx.Client(
            base_url=settings.homeserver_url,
            headers={"Authorization": f"Bearer {settings.as_token}"},
            timeout=httpx.Timeout(60.0, connect=settings.fetch_connect_timeout_seconds),
            follow_redirects=False,
            transport=transport,
        )

    def close(self) -> None:
        self.client.close()

    def _get(self, path: str, as_user: str) -> dict | None:
        try:
            response = self.client.get(path, params={"user_id": as_user})
        except httpx.HTTPError as exc:
            raise HomeserverUnavailable(f"{path}: {exc}") from exc
        if response.status_code in (403, 401):
            raise RoomUnreadable(f"{path}: {response.status_code}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise HomeserverUnavailable(f"{path}: HTTP {response.status_code}")
        if len(response.content) > MAX_MEMBERS_BYTES:
            raise RoomUnreadable(f"{path}: answer too large")
        try:
            body = response.json()
        except ValueError as exc:
            raise HomeserverUnavailable(f"{path}: not JSON") from exc
        return body if isinstance(body, dict) else None

    def read(self, room_id: str, as_user: str) -> RoomSnapshot:
        room = "/_matrix/client/v3/rooms/" + urllib.parse.quote(room_id, safe="")
        members = self._get(f"{room}/joined_members", as_user)
        if members is None:
            raise RoomUnreadable(f"{room_id}: no member list")
        joined: dict[str, ProfileValue] = {}
        raw_joined = members.get("joined")
        for user_id, profile in (raw_joined if isinstance(raw_joined, dict) else {}).items():
            if not is_valid_user_id(user_id):
                continue
            profile = profile if isinstance(profile, dict) else {}
            joined[user_id] = ProfileValue(
                clean_displayname(profile.get("display_name")),
                clean_avatar_url(profile.get("avatar_url")),
            )
        join_rules = self._get(f"{room}/state/m.room.join_rules/", as_user) or {}
        visibility = self._get(f"{room}/state/m.room.history_visibility/", as_user) or {}
        join_rule = join_rules.get("join_rule")
        history = visibility.get("history_visibility")
        return RoomSnapshot(
            joined=joined,
            join_rule=join_rule if isinstance(join_rule, str) else None,
            history_visibility=history if isinstance(history, str) else None,
        )


def snapshot_events(room_id: str, snapshot: RoomSnapshot, known: set[str]) -> list[dict]:
    """The snapshot as the events that would have produced it."""
    events: list[dict] = []
    if snapshot.join_rule is not None:
        events.append(_state(room_id, "m.room.join_rules", {"join_rule": snapshot.join_rule}))
    if snapshot.history_visibility is not None:
        events.append(
            _state(
                room_id,
                "m.room.history_visibility",
                {"history_visibility": snapshot.history_visibility},
            )
        )
    for user_id in sorted(known - snapshot.joined.keys()):
        events.append(_member(room_id, user_id, {"membership": "leave"}))
    for user_id, value in sorted(snapshot.joined.items()):
        content: dict[str, object] = {"membership": "join"}
        if value.displayname is not None:
            content["displayname"] = value.displayname
        if value.avatar_url is not None:
            content["avatar_url"] = value.avatar_url
        events.append(_member(room_id, user_id, content))
    return events


def _state(room_id: str, event_type: str, content: dict) -> dict:
    return {"type": event_type, "room_id": room_id, "state_key": "", "content": content}


def _member(room_id: str, user_id: str, content: dict) -> dict:
    return {"type": "m.room.member", "room_id": room_id, "state_key": user_id, "content": content}


class SnapshotStale(Exception):
    """Member events for the room arrived while its snapshot was being read."""


def apply_snapshot(
    conn: Connection,
    room_id: str,
    snapshot: RoomSnapshot,
    *,
    read_after: int | None,
    server_name: str,
    now_ms: int,
    profile_max_age_seconds: float,
) -> BatchOutcome:
    """Apply a snapshot read after the room's member-event counter was `read_after`.

    If events came in since, the snapshot may predate them (a join it lacks would be
    taken for a leave), so it is refused and must be read again.
    """
    if room_store.member_events(conn, room_id, lock=True) != read_after:
        raise SnapshotStale(room_id)
    known = room_store.members_of(conn, {room_id})
    outcome = process_events(
        conn,
        snapshot_events(room_id, snapshot, known),
        server_name=server_name,
        now_ms=now_ms,
        profile_max_age_seconds=profile_max_age_seconds,
    )
    room_store.clear_backfill(conn, room_id)
    return outcome
