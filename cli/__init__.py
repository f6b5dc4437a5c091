"""The operator's commands (`python -m directory <command> --help`).

Every failure an operator can fix ends in one line on stderr that says what to fix,
and a non-zero exit status: 2 for configuration and reachability, 1 for work that
finished with failures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from directory.config import get_settings

PROG = "python -m directory"


class CommandError(Exception):
    """One line for the operator; the command exits with `status`."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    registration = commands.add_parser(
        "registration",
        help="print an appservice registration YAML for the homeserver",
        description="Prints the registration YAML on stdout, then the matching settings "
        "as comments. Tokens come from AS_TOKEN/HS_TOKEN when set, else are random.",
    )
    registration.add_argument("--url", help="where the homeserver reaches this server")
    registration.add_argument("--env-file", type=Path, help="also write the settings here")

    bootstrap = commands.add_parser(
        "bootstrap",
        help="load every room the homeserver is already in",
        description="Lists every room our homeserver is in and loads each one through the "
        "workers (public profiles are fetched, per-room names stay private), showing "
        "progress until it is done. With ADMIN_TOKEN set, rooms come from Synapse's admin "
        "room list; otherwise give --users-file. Interrupted (the CLI or the workers), it "
        "resumes where it stood when run again; run after it finished, it reads every "
        "room again and changes nothing that was right.",
    )
    bootstrap.add_argument(
        "--users-file",
        type=Path,
        help="local user ids, one per line: load the rooms they are joined to (any "
        "homeserver; no admin token needed)",
    )
    bootstrap.add_argument("--status", action="store_true", help="print where the run stands")
    bootstrap.add_argument("--json", action="store_true", help="with --status: as JSON")
    bootstrap.add_argument(
        "--restart", action="store_true", help="abandon the unfinished run and start anew"
    )
    bootstrap.add_argument(
        "--no-wait", action="store_true", help="start or resume the run, then return"
    )

    reconcile = commands.add_parser(
        "reconcile",
        help="read rooms again now and repair what events missed",
        description="Reads the room (or every room we can see) again through the workers "
        "and repairs missing or extra members, join rule and history visibility, as the "
        "scheduled check does every ROOM_RECHECK_SECONDS. Prints the repairs made.",
    )
    target = reconcile.add_mutually_exclusive_group(required=True)
    target.add_argument("room_id", nargs="?", help="the room to read again")
    target.add_argument("--all", action="store_true", help="every room we can see")
    reconcile.add_argument("--no-wait", action="store_true", help="queue the reads, then return")

    status = commands.add_parser(
        "status",
        help="the directory at a glance: entries, fetches, inbox, backoffs, bootstrap, checks",
        description="Entries and visible rooms; pending fetches by state (due, in flight i.e. "
        "claimed by a fetch run, waiting for a retry, given up) and how long the oldest has "
        "been due; the inbox backlog; destinations in backoff (the worst 10); the latest "
        "bootstrap run; the rooms checked within ROOM_RECHECK_SECONDS and the repairs so "
        "far. Read from the database only.",
    )
    status.add_argument("--json", action="store_true", help="as JSON, for scripts (stable keys)")

    explain = commands.add_parser(
        "explain",
        help="why a user is or is not listed, and who can find them",
        description="Shows the user's entry (a placeholder, or the public profile a fetch "
        "brought: never a per-room name or avatar), the rooms that make them visible, "
        "whether strangers and room mates can find them, their last fetch, their pending "
        "fetch and their server's health. Exits 1 for a user we know nothing of.",
    )
    explain.add_argument("user_id", help="e.g. @alice:example.org")

    requeue = commands.add_parser(
        "requeue",
        help="make pending fetches due now, with a fresh attempt budget",
        description="The user's pending fetch, a server's (whose backoff is cleared too), "
        "or every given-up one is due now with its attempts starting over; fetch runs are "
        "published for the servers concerned. Prints how many users became due.",
    )
    requeue_target = requeue.add_mutually_exclusive_group(required=True)
    requeue_target.add_argument("user_id", nargs="?", help="one user's pending fetch")
    requeue_target.add_argument(
        "--server", metavar="NAME", help="every pending fetch of this server; clears its backoff"
    )
    requeue_target.add_argument(
        "--given-up", action="store_true", help="every fetch given up after MAX_FETCH_ATTEMPTS"
    )

    refresh = commands.add_parser(
        "refresh",
        help="fetch a user's public profile again now",
        description="Queues a fresh fetch of the user's public profile, due now, and "
        "publishes it. The user must have an entry.",
    )
    refresh.add_argument("user_id", help="e.g. @alice:example.org")

    forget = commands.add_parser(
        "forget",
        help="erase everything held for a user (an erasure request)",
        description="Removes the user's entry, pending fetch and memberships with their "
        "per-room names and avatars, as a leave from each of their rooms applied by the one "
        "writer; rooms whose last local member they were stop being visible. Prints what "
        "was removed. They are still in those rooms: events still arriving for them, or a "
        "room's scheduled check, bring them back as a new user.",
    )
    forget.add_argument("user_id", help="e.g. @alice:example.org")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValueError as exc:
        print(f"{PROG} {args.command}: bad setting: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "registration":
            from cli.registration import run as run_registration

            return run_registration(args, settings)
        if args.command == "bootstrap":
            from cli.bootstrap import run as run_bootstrap

            return run_bootstrap(args, settings)
        if args.command == "status":
            from cli.status import run as run_status

            return run_status(args, settings)
        if args.command == "explain":
            from cli.explain import run as run_explain

            return run_explain(args, settings)
        if args.command in ("requeue", "refresh", "forget"):
            from cli import users

            return getattr(users, f"run_{args.command}")(args, settings)
        from cli.reconcile import run as run_reconcile

        return run_reconcile(args, settings)
    except CommandError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
