"""Worker process entry point: `python worker.py [celery worker options]`.

Defaults: every queue, a WORKER_POOL pool (threads unless configured: profile fetches
wait on the network, not the CPU) of WORKER_CONCURRENCY threads or processes, task
events on for Flower. Any option given on the command line wins, e.g.
`python worker.py -Q fetch -c 32` for a fetch-only worker.
"""

from __future__ import annotations

import sys

from directory.config import get_settings
from directory.logs import configure_logging
from tasks.app import ALL_QUEUES, app


def main(argv: list[str]) -> None:
    configure_logging(get_settings(), "worker")
    settings = get_settings()
    defaults = {
        ("-Q", "--queues"): ",".join(ALL_QUEUES),
        ("-P", "--pool"): settings.worker_pool,
        ("-c", "--concurrency"): str(settings.worker_concurrency),
        ("-l", "--loglevel"): "INFO",
    }
    args = ["worker", "--events", "--without-gossip", "--without-mingle"]
    for names, value in defaults.items():
        if not any(a in names or a.startswith(names[1] + "=") for a in argv):
            args += [names[1], value]
    app.worker_main(args + argv)


if __name__ == "__main__":
    main(sys.argv[1:])
