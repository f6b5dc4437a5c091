"""`python -m directory registration`: the appservice registration for the homeserver."""

from __future__ import annotations

import argparse
import sys

from directory.config import Settings
from directory.registration import Registration


def run(args: argparse.Namespace, settings: Settings) -> int:
    reg = Registration.for_settings(settings, args.url)
    env = reg.env(settings)
    sys.stdout.write(reg.yaml())
    sys.stdout.write("# Settings for this service (e.g. in .env) matching this file:\n")
    sys.stdout.write("".join(f"# {line}\n" for line in env.splitlines()))
    if args.env_file:
        args.env_file.write_text(env)
    return 0
