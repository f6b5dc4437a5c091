"""contrib/systemd: the units run the same processes as `python run.py`, each restarted on
failure with a bounded stop, and `systemd-analyze verify` accepts them (where it is
installed) once pointed at this checkout."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import run
from directory.config import PROJECT_ROOT

UNITS = PROJECT_ROOT / "contrib" / "systemd"
INSTALLED_AT = "/opt/matrix-user-directory"
SERVICES = (
    "directory-server.service",
    "directory-worker-events.service",
    "directory-worker-fetch@.service",
    "directory-beat.service",
)
TARGET = "directory.target"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  (keys are case-sensitive)
    parser.read_string((UNITS / name).read_text())
    return parser


def _command(name: str) -> list[str]:
    """ExecStart's arguments after the interpreter, with systemd's %% unescaped."""
    argv = shlex.split(_unit(name)["Service"]["ExecStart"].replace("%%", "%"))
    assert argv[0] == f"{INSTALLED_AT}/.venv/bin/python", argv
    return argv[1:]


def _without_name(argv: list[str]) -> list[str]:
    i = argv.index("-n")
    return argv[:i] + argv[i + 2 :]


def test_every_unit_is_there_and_the_target_wants_each_service() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == sorted((*SERVICES, TARGET))
    wanted = _unit(TARGET)["Unit"]["Wants"].split()
    assert wanted == [
        "directory-server.service",
        "directory-worker-events.service",
        "directory-worker-fetch@1.service",
        "directory-beat.service",
    ]
    assert _unit(TARGET)["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("name", SERVICES)
def test_a_service_runs_the_venv_python_with_the_environment_file_and_restarts(
    name: str,
) -> None:
    service = _unit(name)["Service"]
    assert service["WorkingDirectory"] == INSTALLED_AT
    assert service["EnvironmentFile"] == "/etc/matrix-user-directory/directory.env"
    assert service["Restart"] == "on-failure"
    # SIGTERM to the main process (Celery's warm shutdown stops its own pool), SIGKILL
    # to whatever is left after a bounded wait.
    assert service["KillMode"] == "mixed"
    assert 0 < int(service["TimeoutStopSec"]) <= 30
    assert _unit(name)["Unit"]["PartOf"] == TARGET
    assert _unit(name)["Install"]["WantedBy"] == TARGET


def test_the_units_run_what_run_py_runs() -> None:
    layout = dict(run.layout())
    assert _command("directory-server.service") == list(layout["server"])
    assert _command("directory-worker-events.service") == list(layout["events worker"])
    fetch = _command("directory-worker-fetch@.service")
    assert _without_name(fetch) == _without_name(list(layout["fetch worker"]))
    assert fetch[fetch.index("-n") + 1] == "fetch-%i@%h"
    beat = _command("directory-beat.service")
    assert beat[:1] == list(layout["beat"])
    assert beat[1:] == ["--schedule", "/var/lib/matrix-user-directory/celerybeat-schedule"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point copies at this checkout.
    for unit in UNITS.iterdir():
        text = unit.read_text().replace(INSTALLED_AT, str(PROJECT_ROOT))
        (tmp_path / unit.name).write_text(text)
    assert (PROJECT_ROOT / ".venv" / "bin" / "python").exists()
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    # Unknown keys and unparsable values are only warnings: any output fails the test.
    assert result.returncode == 0, output
    assert output == ""
