"""Backing services and processes for one benchmark run, all torn down at the end.

Everything runs on 127.0.0.1: a database of our own on the shared PostgreSQL (created
and dropped here), a redis-server of our own on a free port (never the shared 6379,
which other engineers' tests use), the fake homeserver, and the service's own entry
points (server.py, worker.py, beat.py) as subprocesses configured by environment, as
an operator would run them. Each child gets its own session, so it can be stopped as a
group by its own id, and nothing else is ever signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg

from directory.config import PROJECT_ROOT
from tests.support.processes import wait_until
from tests.support.services import PrivateRedis, free_port  # noqa: F401  (re-exported)

PG_ADMIN_DSN = os.environ.get(
    "BENCH_PG_ADMIN_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process, from /proc (no psutil needed)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def tree_rss_bytes(pid: int) -> int:
    """Resident set size of a process and its live children (a prefork pool's children
    do the fetching; the parent only hands out tasks)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            total += rss_bytes(p)
        except (OSError, RuntimeError):
            continue
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(c) for c in children.read().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its live children (a prefork pool) have
    used so far, threads included."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class MachineCpu:
    """How busy all CPUs were between start() and busy(): 1.0 is every core, all the
    time. Includes the machine's other tenants, which is the point: it tells whether
    a figure was bounded by CPU at all."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    def busy(self) -> float:
        busy, total = self._read()
        return (busy - self._start[0]) / max(1, total - self._start[1])


class Database:
    """bench_<pid> on the shared PostgreSQL; dropped (forcibly) at the end."""

    def __init__(self) -> None:
        self.name = f"bench_{os.getpid()}"
        self.dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={self.name}"
        self.url = f"postgresql://postgres@127.0.0.1:5432/{self.name}"
        self.created = False

    def create(self) -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.created = True

    def migrate(self, env: dict[str, str], log: Path) -> None:
        # The operator's command, as the README gives it.
        with log.open("ab") as out:
            subprocess.run(
                [sys.executable, "-m", "alembic", "upgrade", "head"],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=120,
            )

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.dsn, **kwargs)

    def truncate_all(self) -> None:
        with self.connect(autocommit=True) as conn:
            conn.execute(
                "TRUNCATE pending_fetches, user_directory, room_members, rooms, destinations,"
                " appservice_transactions, event_inbox, counters, bootstrap_users,"
                " bootstrap_rooms, bootstrap_runs"
            )

    def drop(self) -> None:
        if not self.created:
            return
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.created = False


class Processes:
    """Children of this run, by name; each in its own session, stopped by its own id."""

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self.logdir = logdir
        self.env = env
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        # Where each child's output starts in its log: a name reused by a later phase
        # appends to the same file, and an old "ready" line must not count.
        self.log_start: dict[str, int] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Path:
        log = self.logdir / f"{name}.log"
        with log.open("ab") as out:
            self.log_start[name] = out.tell()
            self.children[name] = subprocess.Popen(
                [sys.executable, *argv],
                cwd=PROJECT_ROOT,
                env={**self.env, **(env or {}), "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return log

    def wait_for_log(self, name: str, marker: bytes, timeout: float = 60) -> None:
        log = self.logdir / f"{name}.log"

        def ready() -> bool:
            process = self.children[name]
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")
            with log.open("rb") as file:
                file.seek(self.log_start.get(name, 0))
                return marker in file.read()

        wait_until(ready, timeout, 0.1, f"{name} ({log})")

    def pid(self, name: str) -> int:
        return self.children[name].pid

    def start_server(self, name: str = "server") -> None:
        self.spawn(name, ["server.py"])
        self.wait_for_log(name, b"Uvicorn running on")

    def start_worker(self, name: str, *extra: str, wait: bool = True) -> None:
        self.spawn(name, ["worker.py", "-n", f"{name}@%h", *extra])
        if wait:
            self.wait_for_log(name, b" ready.")

    def start_beat(self, name: str = "beat") -> None:
        self.spawn(name, ["beat.py", "--schedule", str(self.logdir / f"{name}-schedule")])
        self.wait_for_log(name, b"beat: Starting")

    def start_fake(self, port: int, name: str = "fake") -> None:
        self.spawn(name, ["-m", "bench.fake_homeserver", "--port", str(port)])
        self.wait_for_log(name, b"listening on")

    def stop(self, name: str, grace: float = 3.0) -> None:
        process = self.children.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                # A thread-pool worker finishes its running fetch runs on SIGTERM (up
                # to FETCH_TASK_BUDGET_SECONDS); the benchmark does not wait for that.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

    def stop_matching(self, prefix: str) -> None:
        for name in [n for n in self.children if n.startswith(prefix)]:
            self.stop(name)

    def stop_all(self) -> None:
        for name in list(self.children):
            self.stop(name)


class Fake:
    """Client of the fake homeserver's control endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)

    def stats(self) -> dict[str, Any]:
        return self.http.get("/_bench/stats").json()

    def reset(self) -> None:
        self.http.post("/_bench/reset").raise_for_status()

    def configure(self, latency_ms: float, max_concurrent: int = 3) -> None:
        self.http.post(
            "/_bench/config",
            content=json.dumps({"latency_ms": latency_ms, "max_concurrent": max_concurrent}),
        ).raise_for_status()

    def set_rooms(self, spec: dict[str, int]) -> None:
        """The generated homeserver the admin API serves (bench/roomset.py)."""
        self.http.post("/_bench/rooms", content=json.dumps(spec)).raise_for_status()

    def set_versions(self, versions: dict[str, int]) -> None:
        self.http.post("/_bench/profiles", content=json.dumps(versions)).raise_for_status()

    def close(self) -> None:
        self.http.close()
