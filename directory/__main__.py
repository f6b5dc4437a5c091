"""Operator commands: `python -m directory registration [--url URL] [--env-file PATH]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from directory.config import get_settings
from directory.registration import Registration


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m directory")
    commands = parser.add_subparsers(dest="command", required=True)
    registration = commands.add_parser(
        "registration",
        help="print an appservice registration YAML for the homeserver",
        description="Prints the registration YAML on stdout, then the matching settings "
        "as comments. Tokens come from AS_TOKEN/HS_TOKEN when set, else are random.",
    )
    registration.add_argument("--url", help="where the homeserver reaches this server")
    registration.add_argument("--env-file", type=Path, help="also write the settings here")
    args = parser.parse_args(argv)

    settings = get_settings()
    reg = Registration.for_settings(settings, args.url)
    env = reg.env(settings)
    sys.stdout.write(reg.yaml())
    sys.stdout.write("# Settings for this service (e.g. in .env) matching this file:\n")
    sys.stdout.write("".join(f"# {line}\n" for line in env.splitlines()))
    if args.env_file:
        args.env_file.write_text(env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
