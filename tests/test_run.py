"""`python run.py`, the supervisor behind `make run`: the real server, workers and beat
start; Ctrl-C or SIGTERM stops every one of them within 10 s with a bounded log; a
child that dies takes the others down and the supervisor says which one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from directory.config import PROJECT_ROOT, Settings
from tests.conftest import with_settings
from tests.support.fake_homeserver import FakeHomeserver
from tests.support.processes import settings_env, wait_until
from tests.support.services import free_port

STOP_LIMIT_SECONDS = 10.0
# Lines the whole layout may write from the stop signal on: a stop is a few lines per
# process, not a flood.
MAX_STOP_LINES = 150
NAMES = ("server", "events worker", "fetch worker", "beat")


@dataclass(frozen=True)
class Proc:
    pid: int
    start_time: int  # clock ticks after boot: tells a reused pid apart

    def alive(self) -> bool:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        return int(fields[19]) == self.start_time and fields[0] != "Z"


def _proc(pid: int) -> Proc | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return Proc(pid, int(fields[19]))


def _tree(pid: int) -> list[Proc]:
    """The process and all its descendants alive now."""
    found: list[Proc] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        proc = _proc(current)
        if proc is None:
            continue
        found.append(proc)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            children = []
        todo += [int(c) for c in children]
    return found


class Supervised:
    """`python run.py` started as an operator would, with the test's services."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.log_path = tmp_path / "run.log"
        self.url = f"http://127.0.0.1:{settings.http_port}"
        env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "run.py", "--beat-schedule", str(tmp_path / "beat-schedule")],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group, as a shell gives a foreground command.
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> dict[str, int]:
        return {
            name: int(pid)
            for name, pid in re.findall(r"run\.py: started the (.+?) \(pid (\d+)\)", self.log())
        }

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"run.py exited with {self.process.returncode}:\n{self.log()}")
            log = self.log()
            if log.count(" ready.") < 2 or "beat: Starting" not in log:
                return False
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 90, 0.2, f"the layout to be up (log: {self.log_path})")
        assert set(self.child_pids()) == set(NAMES)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.child_pids().values():
            for proc in _tree(pid):
                os.kill(proc.pid, signal.SIGKILL)


@pytest.fixture
def supervised(db: Engine, redis_client: object, settings: Settings, tmp_path: Path):
    with FakeHomeserver() as homeserver:
        homeserver.set_token(settings.as_token, "@userdirectory:ours.test")
        configured = with_settings(settings, homeserver_url=homeserver.url, http_port=free_port())
        run = Supervised(configured, tmp_path)
        try:
            run.wait_ready()
            yield run
        finally:
            run.kill()


def _stopped_in_time(run: Supervised, send: Callable[[], None]) -> float:
    everything = sorted(
        {p for pid in [run.process.pid, *run.child_pids().values()] for p in _tree(pid)},
        key=lambda p: p.pid,
    )
    assert len(everything) >= 5  # the supervisor and its four children at least
    lines_before = run.log().count("\n")
    started = time.monotonic()
    send()
    run.process.wait(timeout=STOP_LIMIT_SECONDS + 5)
    elapsed = time.monotonic() - started
    # Children are reaped before the supervisor exits; give /proc a moment for the rest.
    wait_until(lambda: not any(p.alive() for p in everything), 2, 0.05, "every process gone")
    log = run.log()
    print(f"stopped {len(everything)} processes in {elapsed:.2f} s")
    assert elapsed < STOP_LIMIT_SECONDS, log
    assert log.count("\n") - lines_before <= MAX_STOP_LINES, log[-5000:]
    assert log.count("Warm shutdown") <= 2, log[-5000:]  # one per worker
    return elapsed


def test_sigterm_stops_every_process_within_10_seconds(supervised: Supervised) -> None:
    _stopped_in_time(supervised, lambda: supervised.process.send_signal(signal.SIGTERM))
    assert supervised.process.returncode == 0
    assert "run.py: SIGTERM received: stopping every process" in supervised.log()


def test_ctrl_c_stops_every_process_within_10_seconds(supervised: Supervised) -> None:
    # What the terminal does on Ctrl-C: SIGINT to the foreground process group. Pressed
    # twice, it changes nothing.
    def ctrl_c() -> None:
        os.killpg(supervised.process.pid, signal.SIGINT)
        time.sleep(0.3)
        os.killpg(supervised.process.pid, signal.SIGINT)

    _stopped_in_time(supervised, ctrl_c)
    assert supervised.process.returncode == 0
    assert supervised.log().count("received: stopping every process") == 1


def test_a_child_that_dies_stops_the_others_and_is_named(supervised: Supervised) -> None:
    fetch_pid = supervised.child_pids()["fetch worker"]
    _stopped_in_time(supervised, lambda: os.kill(fetch_pid, signal.SIGKILL))
    assert supervised.process.returncode == 1
    log = supervised.log()
    assert f"run.py: the fetch worker (pid {fetch_pid}) exited: killed by SIGKILL" in log
    assert "exiting with status 1 because the fetch worker exited" in log


def test_children_stop_when_the_supervisor_itself_is_killed(supervised: Supervised) -> None:
    """A SIGKILLed supervisor cannot pass anything on: each child gets SIGTERM from the
    kernel (PR_SET_PDEATHSIG) and stops as on a normal stop."""
    children = sorted(
        {p for pid in supervised.child_pids().values() for p in _tree(pid)}, key=lambda p: p.pid
    )
    assert len(children) >= 4
    started = time.monotonic()
    supervised.process.send_signal(signal.SIGKILL)
    supervised.process.wait(timeout=5)
    wait_until(
        lambda: not any(p.alive() for p in children),
        STOP_LIMIT_SECONDS,
        0.05,
        "every child gone after the supervisor was killed",
    )
    print(f"children gone {time.monotonic() - started:.2f} s after the supervisor was killed")
