"""`python -m directory status [--json]`: the whole directory at a glance (read from the
database only, so it answers whether or not workers or Redis run)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from cli.common import duration, open_database, when
from directory import operator
from directory.clock import now_ms
from directory.config import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    engine = open_database(settings)
    with engine.connect() as conn:
        state = operator.status(conn, settings, now_ms())
    if args.json:
        print(json.dumps(asdict(state), indent=2, sort_keys=True))
    else:
        print("\n".join(lines(state)))
    return 0


def _n(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _age(seconds: float | None, none: str = "-") -> str:
    return none if seconds is None else duration(seconds)


def _span(seconds: float) -> str:
    """A setting's duration: "7 days", "6 h", else H:MM:SS."""
    whole = int(seconds)
    if whole == seconds and whole and whole % 86400 == 0:
        return f"{whole // 86400} day{'s' if whole != 86400 else ''}"
    if whole == seconds and whole and whole % 3600 == 0:
        return f"{whole // 3600} h"
    return duration(seconds)


def lines(state: operator.Status) -> list[str]:
    out = [
        f"entries           {state.entries:,}",
        f"visible rooms     {state.visible_rooms:,}",
    ]
    p = state.pending_fetches
    fetches = (
        f"pending fetches   {p.due:,} due, {p.in_flight:,} in flight, {p.waiting:,} waiting,"
        f" {p.given_up:,} given up"
    )
    if p.oldest_due_age_seconds is not None:
        fetches += f"; oldest due for {_age(p.oldest_due_age_seconds)}"
    out.append(fetches)
    if p.due_behind_backoff:
        out.append(
            f"                  ({p.due_behind_backoff:,} due wait for their server's backoff)"
        )
    i = state.inbox
    inbox = f"inbox             {_n(i.events, 'event')} in {_n(i.transactions, 'transaction')}"
    if i.oldest_age_seconds is not None:
        inbox += f", oldest accepted {_age(i.oldest_age_seconds)} ago"
    out.append(inbox)
    out.append(f"backed off        {_n(state.backed_off_destinations, 'destination')}")
    for d in state.worst_backoffs:
        error = f": {d.last_error[:80]}" if d.last_error else ""
        out.append(
            f"  {d.server_name}  {_age(d.seconds_left)} left,"
            f" {_n(d.consecutive_failures, 'failure')} in a row,"
            f" {_n(d.pending_users, 'user')} waiting{error}"
        )
    b = state.bootstrap
    if b is None:
        out.append("bootstrap         never run")
    else:
        rooms = b.rooms
        out.append(
            f"bootstrap         run {b.run_id} {b.state} (started {when(b.started_at_ms)}):"
            f" rooms {rooms['loaded']:,} loaded, {rooms['waiting']:,} waiting,"
            f" {rooms['read']:,} read, {rooms['failed']:,} failed of {rooms['listed']:,}"
            f" listed; {_n(b.memberships, 'membership')}"
        )
        if b.last_error and b.state != "finished":
            out.append(f"                  waiting: {b.last_error[:120]}")
    r = state.reconciliation
    recheck = _span(r.recheck_seconds)
    checks = (
        f"reconciliation    {r.checked_recently:,}/{r.visible_rooms:,} visible rooms checked in"
        f" the last {recheck}"
    )
    if r.never_checked:
        checks += f", {r.never_checked:,} never"
    if r.oldest_check_age_seconds is not None:
        checks += f"; oldest check {_age(r.oldest_check_age_seconds)} ago"
    out.append(checks)
    repairs = ", ".join(f"{kind} {n:,}" for kind, n in r.repairs.items() if n)
    out.append(f"                  repairs so far: {repairs or 'none'}")
    return out
