"""Real worker and beat processes for the tests, started as an operator would."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from directory.config import PROJECT_ROOT, Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce these settings in another process."""
    env: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f.name.upper()] = str(value)
    return env


def wait_until(
    predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = ""
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class ProcessGroup:
    """Worker and beat processes sharing one configuration; all killed at the end."""

    def __init__(self, settings: Settings, logdir: Path) -> None:
        self.env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        self.logdir = logdir
        self.processes: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, argv: list[str]) -> Path:
        log = self.logdir / f"{name}.log"
        with log.open("ab") as out:
            self.processes[name] = subprocess.Popen(
                [sys.executable, *argv],
                cwd=PROJECT_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return log

    def start_worker(self, name: str = "worker1", *extra: str, timeout: float = 60) -> None:
        log = self._spawn(name, ["worker.py", "-n", f"{name}@%h", *extra])
        wait_until(
            lambda: self._alive(name) and b" ready." in log.read_bytes(),
            timeout,
            what=f"{name} to be ready (log: {log})",
        )

    def start_server(self, name: str = "server", timeout: float = 60) -> None:
        log = self._spawn(name, ["server.py"])
        wait_until(
            lambda: self._alive(name) and b"Uvicorn running on" in log.read_bytes(),
            timeout,
            what=f"{name} to listen (log: {log})",
        )

    def start_beat(self, name: str = "beat", timeout: float = 60) -> None:
        log = self._spawn(name, ["beat.py", "--schedule", str(self.logdir / f"{name}-schedule")])
        wait_until(
            lambda: self._alive(name) and b"beat: Starting" in log.read_bytes(),
            timeout,
            what=f"{name} to start (log: {log})",
        )

    def _alive(self, name: str) -> bool:
        process = self.processes[name]
        if process.poll() is not None:
            log = (self.logdir / f"{name}.log").read_text(errors="replace")[-4000:]
            raise AssertionError(f"{name} exited with {process.returncode}:\n{log}")
        return True

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for name in list(self.processes):
            self.kill(name, sig)
