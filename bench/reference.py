"""The reference implementation's refresh of stale remote profiles, simulated in
virtual time, and the politeness bound.

What Synapse (1.163, synapse/handlers/user_directory.py) does with a backlog of stale
remote users, all due (e.g. after a restart, or users queued while it was busy):

- A master loop `_unsafe_refresh_remote_profiles` runs every
  INTERVAL_TO_ADD_MORE_SERVERS_TO_REFRESH_PROFILES (15 s). It asks the database for
  `limit = 5 - len(servers in flight)` servers with due users:
  `SELECT user_server_name ... WHERE next_try_at_ts < now GROUP BY user_server_name
   ORDER BY MIN(next_try_at_ts), user_server_name LIMIT limit`,
  and starts a per-server loop for each one not already in flight. Servers in flight
  still have due rows until their last user is done, so they are returned too and use
  up part of `limit`: a finished server's place is refilled only at a later tick, and
  only when few enough servers are in flight.
- A per-server loop fetches that server's due users one at a time, in batches of 10,
  until none is due; every request here takes the remote's latency (50 ms).
- Every stale row has the same next_try_at_ts in this scenario, so servers are taken
  in name order (our server names are shuffled against their sizes).

Favouring the reference, the simulation charges nothing for database work, starts at
the first master tick (Synapse waits 10 s after start-up) and ignores the one-minute
delay Synapse puts before a first fetch (USER_DIRECTORY_STALE_REFRESH_TIME).

A second variant models users whose events arrived in the last minute: each such event
also schedules a direct wake-up of its server 61 s later, outside the 5-server limit,
so every server runs at once from t = 61 s, still one user at a time.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

MAX_SERVERS = 5
INTERVAL_S = 15.0
STALE_DELAY_S = 60.0


@dataclass(frozen=True)
class Run:
    server: str
    start: float
    users: int


@dataclass(frozen=True)
class Simulation:
    seconds: float
    runs: list[Run]
    latency: float

    def done_at(self, t: float) -> int:
        """Users whose profile is fetched by virtual time t."""
        total = 0
        for run in self.runs:
            if t > run.start:
                total += min(run.users, int((t - run.start) / self.latency + 1e-9))
        return total

    def curve(self, points: int = 200) -> list[tuple[float, int]]:
        return [
            (self.seconds * i / points, self.done_at(self.seconds * i / points))
            for i in range(points + 1)
        ]


def simulate_reference(
    sizes: dict[str, int],
    latency: float,
    max_servers: int = MAX_SERVERS,
    interval: float = INTERVAL_S,
) -> Simulation:
    """The backlog case: all users due at t = 0, the master loop as Synapse runs it."""
    remaining = {server: n for server, n in sizes.items() if n > 0}
    in_flight: set[str] = set()
    runs: list[Run] = []
    # (time, order, kind, server): "done" before "tick" at equal times, as a finished
    # run leaves the set before a tick scheduled for the same instant looks at it.
    heap: list[tuple[float, int, str, str]] = [(0.0, 1, "tick", "")]
    end = 0.0
    while heap:
        t, _, kind, server = heapq.heappop(heap)
        if kind == "done":
            in_flight.discard(server)
            del remaining[server]
            end = max(end, t)
            continue
        if not remaining:
            break
        limit = max_servers - len(in_flight)
        if limit > 0:
            # ORDER BY MIN(next_try_at_ts), user_server_name: all due at once, so by name,
            # in-flight servers included.
            for chosen in sorted(remaining)[:limit]:
                if chosen not in in_flight:
                    in_flight.add(chosen)
                    runs.append(Run(chosen, t, remaining[chosen]))
                    heapq.heappush(heap, (t + remaining[chosen] * latency, 0, "done", chosen))
        heapq.heappush(heap, (t + interval, 1, "tick", ""))
    return Simulation(seconds=end, runs=runs, latency=latency)


def simulate_reference_with_wakeups(sizes: dict[str, int], latency: float) -> Simulation:
    """Users whose events just arrived: every server is woken directly at 61 s."""
    start = STALE_DELAY_S + 1.0
    runs = [Run(server, start, n) for server, n in sizes.items() if n > 0]
    return Simulation(
        seconds=start + max(n for n in sizes.values()) * latency, runs=runs, latency=latency
    )


def politeness_bound(sizes: dict[str, int], latency: float, per_server: int) -> float:
    """No polite client can do better: the largest server, `per_server` at a time."""
    return max(sizes.values()) * latency / per_server
