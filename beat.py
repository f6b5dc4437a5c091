"""Beat process entry point: `python beat.py [celery beat options]`.

Runs the schedule in tasks/schedule.py with a leader lock, so a second beat started by
mistake waits instead of sending every task twice.
"""

from __future__ import annotations

import sys

from directory.config import PROJECT_ROOT, get_settings
from directory.logs import configure_logging
from tasks.app import app


def main(argv: list[str]) -> None:
    configure_logging(get_settings(), "beat")
    import tasks.schedule  # noqa: F401  (installs the schedule on the app)

    args = ["beat", "--scheduler", "tasks.schedule:LeaderScheduler", "-l", "INFO"]
    if not any(a in ("-s", "--schedule") or a.startswith("--schedule=") for a in argv):
        (PROJECT_ROOT / "var").mkdir(exist_ok=True)
        args += ["--schedule", str(PROJECT_ROOT / "var" / "celerybeat-schedule")]
    app.start(args + argv)


if __name__ == "__main__":
    main(sys.argv[1:])
