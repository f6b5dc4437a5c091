"""Supervisor entry point: `python run.py` runs the whole service on one machine.

It starts the default process layout (`LAYOUT`): the HTTP server, an events worker
(the inbox consumer, room reads and beat's jobs), a fetch worker (profile requests,
apart so that fetching never delays applying events) and beat. Each child runs in a
process group of its own and writes to this process's stdout and stderr.

Stopping: Ctrl-C, SIGTERM or SIGHUP is passed on once, as SIGTERM, to each child; what
has not exited STOP_GRACE_SECONDS later is killed (SIGKILL, its whole group), so
everything is gone within 10 s. Further signals while stopping change nothing. Exit
status 0.

If a child exits on its own, the others are stopped the same way and this process
exits with status 1, after one line saying which child exited and how. If this process
is killed outright (SIGKILL), the kernel sends each child SIGTERM (Linux).

`make run` runs it after installing, starting Redis if needed and migrating.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent

# name -> entry point and options, in start order. Workers are named apart (-n) so that
# Flower and `celery inspect` tell them apart.
LAYOUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("server", ("server.py",)),
    ("events worker", ("worker.py", "-Q", "events,maintenance", "-c", "4", "-n", "events@%h")),
    ("fetch worker", ("worker.py", "-Q", "fetch", "-n", "fetch@%h")),
    ("beat", ("beat.py",)),
)

# After SIGTERM, how long a child may take to exit before it is killed. A worker's warm
# shutdown waits for its running tasks; a fetch run can last FETCH_TASK_BUDGET_SECONDS,
# and what a killed run held comes back by itself (leases, acks_late).
STOP_GRACE_SECONDS = 8.0
POLL_SECONDS = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def say(message: str) -> None:
    print(f"run.py: {message}", file=sys.stderr, flush=True)


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _parent_death_signal() -> Callable[[], None] | None:
    """What a child runs before exec so that it gets SIGTERM if the supervisor itself
    dies (even by SIGKILL) and no child outlives it: prctl(PR_SET_PDEATHSIG), Linux
    only (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return set_signal


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        """Whether the process has exited, without reaping it: until it is reaped its
        pid (and so its process group id) cannot be reused, so signalling the group
        stays safe."""
        if self.process.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def reap(self) -> int:
        return self.process.wait()


class Supervisor:
    def __init__(self, layout: Sequence[tuple[str, Sequence[str]]], python: str) -> None:
        self.layout = layout
        self.python = python
        self.children: list[Child] = []
        self.stop_signal: int | None = None
        self._preexec = _parent_death_signal()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum

    def start(self) -> None:
        for name, argv in self.layout:
            if self.stop_signal is not None:
                return
            process = subprocess.Popen(
                [self.python, *argv],
                cwd=PROJECT_ROOT,
                # A session (and process group) of its own: a Ctrl-C at the terminal
                # reaches only the supervisor, which passes it on once.
                start_new_session=True,
                preexec_fn=self._preexec,
            )
            self.children.append(Child(name, process))
            say(f"started the {name} (pid {process.pid}): python {' '.join(argv)}")

    def run(self) -> int:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            self.start()
            while self.stop_signal is None:
                dead = next((c for c in self.children if c.exited()), None)
                if dead is not None:
                    # Its group first (a killed prefork parent leaves its children
                    # behind), while its unreaped pid still names the group.
                    dead.signal_group(signal.SIGKILL)
                    status = describe_status(dead.reap())
                    say(f"the {dead.name} (pid {dead.pid}) exited: {status}; stopping the others")
                    self.stop()
                    say(f"stopped; exiting with status 1 because the {dead.name} exited")
                    return 1
                time.sleep(POLL_SECONDS)
        except BaseException:
            self.stop()
            raise
        say(f"{signal.Signals(self.stop_signal).name} received: stopping every process")
        self.stop()
        say("stopped")
        return 0

    def stop(self) -> None:
        """SIGTERM once to each live child, SIGKILL to the groups of those still there
        after STOP_GRACE_SECONDS, then every group is cleared (a worker's pool children
        outlive a killed parent) and every child reaped."""
        started = time.monotonic()
        for child in self.children:
            if not child.exited():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        deadline = started + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and not all(c.exited() for c in self.children):
            time.sleep(POLL_SECONDS)
        for child in self.children:
            if not child.exited():
                say(f"the {child.name} (pid {child.pid}) did not stop in time: killing it")
        for child in self.children:
            if child.process.returncode is None:  # not reaped: the group id is still ours
                child.signal_group(signal.SIGKILL)
        for child in self.children:
            child.reap()


def layout(beat_schedule: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """LAYOUT, with beat's schedule file (its last-run times) elsewhere if asked."""
    processes = list(LAYOUT)
    if beat_schedule:
        processes = [
            (name, (*argv, "--schedule", beat_schedule) if name == "beat" else argv)
            for name, argv in processes
        ]
    return processes


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Run the HTTP server, an events worker, a fetch worker and beat;"
        " Ctrl-C or SIGTERM stops them all within 10 s.",
    )
    parser.add_argument(
        "--beat-schedule",
        metavar="PATH",
        help="beat's schedule file (default: var/celerybeat-schedule in the project)",
    )
    options = parser.parse_args(argv)
    return Supervisor(layout(options.beat_schedule), sys.executable).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
