"""Reading rooms from our own homeserver: a room's current state (as one of its local
members, or as a server admin), the rooms a server admin can list, the rooms a local
user is joined to, and who a token belongs to.

Every way a request can fail is one of four exceptions, because each calls for a
different reaction:
- HomeserverRefused: our token was refused (401). A configuration error: wait and
  retry, blame no room and no user.
- HomeserverUnavailable: 5xx, an answer that is not JSON; its subclass HomeserverDown
  when there was no answer at all (refused, unreachable, timed out). Retry later.
- RateLimited: 429; wait as long as it asks.
- RoomUnreadable: this reader may not see this room (403, 404): try another reader.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httpx

from directory import jsoncodec
from directory.config import Settings
from directory.events import ProfileValue, is_valid_user_id, publicity_value
from directory.matrix_http import matrix_errcode, retry_after_seconds
from directory.text import clean_avatar_url, clean_displayname

logger = logging.getLogger(__name__)

# A room's state can be large (every member event of a big room); anything beyond
# this is not a room we can hold in memory at once.
MAX_STATE_BYTES = 64 * 1024 * 1024
# Everything else we ask for is small.
MAX_LIST_BYTES = 16 * 1024 * 1024
# Reading one big room's state can take the homeserver a while.
READ_TIMEOUT_SECONDS = 60.0
CLIENT_API = "/_matrix/client/v3"
ADMIN_API = "/_synapse/admin"


class HomeserverError(Exception):
    """A request to our homeserver failed; the subclass says how."""


class HomeserverRefused(HomeserverError):
    """Our homeserver refused the token we sent (401): a configuration error."""


class HomeserverUnavailable(HomeserverError):
    """A failure worth retrying: connection, timeout, 5xx, an unreadable answer."""


class HomeserverDown(HomeserverUnavailable):
    """The homeserver did not answer at all (refused, unreachable, timed out): nothing
    is known about the room or user asked for."""


class RateLimited(HomeserverError):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RoomUnreadable(HomeserverError):
    """The homeserver will not show this room to that reader (not joined, unknown)."""


@dataclass(frozen=True)
class RoomSnapshot:
    """A room's current members and publicity, read in one request. Member values are
    (possibly per-room) event values: triggers only, never shown."""

    joined: dict[str, ProfileValue]
    join_rule: str | None
    history_visibility: str | None


@dataclass(frozen=True)
class ListedRoom:
    room_id: str
    joined_local_members: int


@dataclass(frozen=True)
class RoomsPage:
    rooms: list[ListedRoom]
    next_batch: str | None
    total_rooms: int | None


def snapshot_from_state(events: object) -> RoomSnapshot:
    """A room's current state events (as /state returns them) as a snapshot. Malformed
    events are skipped; a missing or malformed join rule or history visibility is
    None, which counts as not public."""
    joined: dict[str, ProfileValue] = {}
    publicity: dict[str, str | None] = {}
    for event in events if isinstance(events, list) else ():
        if not isinstance(event, dict):
            continue
        event_type, state_key = event.get("type"), event.get("state_key")
        content = event.get("content")
        if event_type == "m.room.member":
            if (
                is_valid_user_id(state_key)
                and isinstance(content, dict)
                and content.get("membership") == "join"
            ):
                joined[state_key] = ProfileValue(
                    clean_displayname(content.get("displayname")),
                    clean_avatar_url(content.get("avatar_url")),
                )
        elif event_type == "m.room.join_rules" and state_key == "":
            publicity["join_rule"] = publicity_value(content, "join_rule")
        elif event_type == "m.room.history_visibility" and state_key == "":
            publicity["history_visibility"] = publicity_value(content, "history_visibility")
    return RoomSnapshot(
        joined=joined,
        join_rule=publicity.get("join_rule"),
        history_visibility=publicity.get("history_visibility"),
    )


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


class HomeserverClient:
    """Our homeserver's client and admin APIs; safe to share between threads."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = settings.homeserver_url.rstrip("/")
        self.as_token = settings.as_token
        self.admin_token = settings.admin_token
        self.client = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(
                READ_TIMEOUT_SECONDS, connect=settings.fetch_connect_timeout_seconds
            ),
            follow_redirects=False,
            transport=transport,
        )

    def close(self) -> None:
        self.client.close()

    # -- requests ----------------------------------------------------------------

    def _get(
        self,
        path: str,
        *,
        token: str,
        token_name: str,
        params: dict[str, Any] | None = None,
        max_bytes: int = MAX_LIST_BYTES,
    ) -> Any:
        """GET `path` with `token`; the decoded JSON body of a 200."""
        try:
            with self.client.stream(
                "GET", path, params=params, headers={"Authorization": f"Bearer {token}"}
            ) as response:
                body = self._read(response, path, max_bytes)
                status = response.status_code
                retry_header = response.headers.get("retry-after")
        except httpx.HTTPError as exc:
            raise HomeserverDown(
                f"cannot reach the homeserver at {self.base_url}: {type(exc).__name__}: {exc}"
            ) from exc
        if status == 200:
            try:
                return jsoncodec.loads(body)
            except (ValueError, RecursionError) as exc:
                raise HomeserverUnavailable(f"{path}: the answer is not JSON") from exc
        errcode = matrix_errcode(body)
        detail = f"HTTP {status}" + (f" {errcode}" if errcode else "")
        if status == 401:
            raise HomeserverRefused(f"the homeserver refused {token_name} ({detail})")
        if status == 429:
            raise RateLimited(f"{path}: {detail}", retry_after_seconds(retry_header, body))
        if status in (403, 404):
            raise RoomUnreadable(f"{path}: {detail}")
        raise HomeserverUnavailable(f"{path}: {detail}")

    @staticmethod
    def _read(response: httpx.Response, path: str, max_bytes: int) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise HomeserverUnavailable(f"{path}: answer of {declared} bytes, over {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise HomeserverUnavailable(f"{path}: answer over {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _as_appservice(self, path: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
        return self._get(path, token=self.as_token, token_name="AS_TOKEN", params=params, **kw)

    def _as_admin(self, path: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
        if not self.admin_token:
            raise HomeserverRefused("ADMIN_TOKEN is not set")
        return self._get(
            path, token=self.admin_token, token_name="ADMIN_TOKEN", params=params, **kw
        )

    # -- what we read --------------------------------------------------------------

    def room_state(self, room_id: str, as_user: str) -> RoomSnapshot:
        """The room's current state as a local member sees it. A member who has left
        may still read the state as it was when they left: such a snapshot does not
        show them joined, and is refused (RoomUnreadable)."""
        state = self._as_appservice(
            f"{CLIENT_API}/rooms/{_segment(room_id)}/state",
            {"user_id": as_user},
            max_bytes=MAX_STATE_BYTES,
        )
        if not isinstance(state, list):
            raise HomeserverUnavailable(f"{room_id}: the room state is not a list of events")
        snapshot = snapshot_from_state(state)
        if as_user not in snapshot.joined:
            raise RoomUnreadable(
                f"{room_id}: the state read as {as_user} does not show them joined"
            )
        return snapshot

    def admin_room_state(self, room_id: str) -> RoomSnapshot:
        """The room's current state through Synapse's admin API (no reader needed)."""
        body = self._as_admin(
            f"{ADMIN_API}/v1/rooms/{_segment(room_id)}/state", max_bytes=MAX_STATE_BYTES
        )
        state = body.get("state") if isinstance(body, dict) else None
        if not isinstance(state, list):
            # Taken as the room's state, it would make every member we know leave.
            raise HomeserverUnavailable(f"{room_id}: the admin API sent no state list")
        return snapshot_from_state(state)

    def admin_rooms(self, start: str | None, limit: int) -> RoomsPage:
        """One page of Synapse's admin room list, from `start` (a next_batch)."""
        params: dict[str, Any] = {"limit": limit}
        if start is not None:
            params["from"] = start
        body = self._as_admin(f"{ADMIN_API}/v1/rooms", params)
        if not isinstance(body, dict) or not isinstance(body.get("rooms"), list):
            raise HomeserverUnavailable("the admin room list has no rooms array")
        rooms = []
        for room in body["rooms"]:
            if not isinstance(room, dict) or not isinstance(room.get("room_id"), str):
                continue
            local = room.get("joined_local_members")
            rooms.append(ListedRoom(room["room_id"], local if isinstance(local, int) else 1))
        next_batch = body.get("next_batch")
        total = body.get("total_rooms")
        return RoomsPage(
            rooms=rooms,
            next_batch=None if next_batch is None else str(next_batch),
            total_rooms=total if isinstance(total, int) else None,
        )

    def joined_rooms(self, user_id: str) -> list[str]:
        """The rooms a local user is joined to (the appservice acting as them)."""
        body = self._as_appservice(f"{CLIENT_API}/joined_rooms", {"user_id": user_id})
        rooms = body.get("joined_rooms") if isinstance(body, dict) else None
        if not isinstance(rooms, list):
            raise HomeserverUnavailable("joined_rooms answered without a joined_rooms array")
        return [room for room in rooms if isinstance(room, str)]

    def whoami(self, *, admin: bool = False) -> str:
        """Whom our AS_TOKEN (or ADMIN_TOKEN) belongs to: the cheapest proof that the
        homeserver answers and accepts it."""
        path = f"{CLIENT_API}/account/whoami"
        body = self._as_admin(path) if admin else self._as_appservice(path)
        user_id = body.get("user_id") if isinstance(body, dict) else None
        if not isinstance(user_id, str):
            raise HomeserverUnavailable("whoami answered without a user_id")
        return user_id
