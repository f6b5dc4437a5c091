"""`python -m directory <command>`: the operator's commands.

They live in the top-level `cli` package, beside the other process entry points:
some publish Celery tasks, which the domain (this package) never does.
"""

from __future__ import annotations

import sys

from cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
