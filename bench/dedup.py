"""2. Deduplication: profile requests per distinct change.

Two cases, as the issue gives them: one user in 1,000 rooms renaming once (the rename
is echoed into every room), and 50 users each in 200 rooms renaming once each, their
echoes interleaved (the harder order: every transaction carries several users). The
rooms are visible private rooms; the users first join with their old name and those
first-sight fetches are allowed to finish, then the fake homeserver starts answering
the new names, the counters are zeroed, and the echoes are sent. Once the pipeline is
quiet (nothing pending, no request for a few seconds, beat's reconciliation included)
the fake's per-user request counts are the answer. Target: exactly 1.00.

A third user joins every room with a name its public profile never returns (a bridge's
puppet with the same per-room name in every portal room): the requests for it, first
sight included, must stay at most 2 however many rooms echo the value. And every room
is made visible by its local member's join, which queues one read of the room: the
reads per room joined (the fake counts them) must be exactly 1.00.
"""

from __future__ import annotations

import time
from typing import Any

from bench.context import Context
from bench.events import member_event, room_setup, transactions
from bench.population import LOCAL_SERVER, public_profile

QUIET_SECONDS = 3.0


def run(ctx: Context) -> dict[str, Any]:
    assert ctx.procs and ctx.fake
    sizes = ctx.sizes
    ctx.reset_state()
    ctx.start_workers(1)
    ctx.procs.start_beat()

    rooms = [f"!dedup{i:05d}:{LOCAL_SERVER}" for i in range(sizes.dedup_rooms)]
    solo = "@renamer:solo.example"
    puppet = "@puppet:bridge.example"
    group = [f"@member{k:02d}:group{k % 5}.example" for k in range(sizes.dedup_users)]
    group_rooms = rooms[: sizes.dedup_user_rooms]

    setup = [
        e
        for i, room in enumerate(rooms)
        for e in room_setup(room, f"@local{i % 20:04d}:{LOCAL_SERVER}", False)
    ]
    joins = [_join(room, solo, 0) for room in rooms]
    joins += [_join(room, user, 0) for user in group for room in group_rooms]
    # Never what its profile says: the per-room name a bridge gives its puppet.
    joins += [member_event(room, puppet, "join", "Puppet [bridged]", None) for room in rooms]
    started = time.monotonic()
    with ctx.http() as client:
        ctx.send_transactions(client, transactions(setup + joins, sizes.txn_events), "dedup-join")
        ctx.wait_quiet(timeout=300, quiet_seconds=QUIET_SECONDS)
        joined = ctx.fake.stats()
        first_sight = joined["by_user"]

        # The global renames: the fake answers the new names from now on.
        ctx.fake.set_versions({user: 1 for user in [solo, *group]})
        ctx.fake.reset()
        echoes = [_rename(room, solo) for room in rooms]
        # Round-robin over the group: each transaction mixes many users' echoes.
        echoes += [_rename(room, user) for room in group_rooms for user in group]
        ctx.send_transactions(client, transactions(echoes, sizes.txn_events), "dedup-rename")
        ctx.wait_quiet(timeout=300, quiet_seconds=QUIET_SECONDS)
    by_user = ctx.fake.stats()["by_user"]
    ctx.procs.stop_matching("worker")
    ctx.procs.stop_matching("beat")

    with ctx.db.connect() as conn:
        names = dict(
            conn.execute(
                "SELECT user_id, display_name FROM user_directory WHERE user_id = ANY(%s)",
                ([solo, *group],),
            )
        )
    wrong = [u for u in [solo, *group] if names.get(u) != public_profile(u, 1)["displayname"]]
    cases = [
        _case(f"1 user x {len(rooms)} rooms", [solo], by_user, len(rooms)),
        _case(
            f"{len(group)} users x {len(group_rooms)} rooms",
            group,
            by_user,
            len(group) * len(group_rooms),
        ),
    ]
    puppet_requests = first_sight.get(puppet, 0) + by_user.get(puppet, 0)
    room_reads = joined["room_reads"]
    return {
        "cases": cases,
        "mismatch": {
            "name": f"1 user x {len(rooms)} rooms, a value the profile never returns",
            "echo_events": len(rooms),
            "requests": puppet_requests,
            "pass": puppet_requests <= 2,
        },
        "room_reads": {
            "rooms_joined": len(rooms),
            "reads": room_reads,
            "reads_per_room": room_reads / len(rooms),
            "pass": room_reads == len(rooms),
        },
        "first_sight_requests_per_user": sum(first_sight.get(u, 0) for u in [solo, *group])
        / (1 + len(group)),
        "entries_not_showing_new_name": len(wrong),
        "seconds": time.monotonic() - started,
        "pass": all(c["pass"] for c in cases) and not wrong and puppet_requests <= 2,
    }


def _join(room: str, user: str, version: int) -> dict[str, Any]:
    p = public_profile(user, version)
    return member_event(room, user, "join", p["displayname"], p["avatar_url"])


def _rename(room: str, user: str) -> dict[str, Any]:
    old, new = public_profile(user, 0), public_profile(user, 1)
    return member_event(
        room, user, "join", new["displayname"], new["avatar_url"], {"membership": "join", **old}
    )


def _case(name: str, users: list[str], by_user: dict[str, int], echoes: int) -> dict[str, Any]:
    requests = sum(by_user.get(u, 0) for u in users)
    per_change = requests / len(users)
    return {
        "name": name,
        "echo_events": echoes,
        "changes": len(users),
        "requests": requests,
        "requests_per_change": per_change,
        "max_requests_one_user": max((by_user.get(u, 0) for u in users), default=0),
        "pass": per_change == 1.0 and all(by_user.get(u, 0) == 1 for u in users),
    }
