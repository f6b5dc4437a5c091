"""Who is listed: the entries search may return (issue 13, README "Who is listed").

Every user joined to a visible room has an entry, since their memberships decide who
shares a room with whom; but some entries are *unlisted* (user_directory.listed false,
unlisted_reason saying why) and search never returns them:

- "sender": this appservice's own sender, @SENDER_LOCALPART:SERVER_NAME.
- "namespace": users of the homeserver's other appservices: the sender of each
  registration in APPSERVICE_REGISTRATION_FILES and whoever its exclusive user
  namespaces match. Matched as Synapse matches them for its own directory: Python's
  re.match, anchored at the start of the user id only (a namespace regex should end
  with the server name, as they all do).
- "excluded": users matching one of EXCLUDE_USER_REGEXES (re.fullmatch).
- "deactivated", "support", "guest", "locked": local users as Synapse's admin API describes them
  (GET /_synapse/admin/v2/users/<user_id>, asked with ADMIN_TOKEN whenever a local
  user's profile is fetched). Locked users stay listed with SHOW_LOCKED_USERS. Without
  ADMIN_TOKEN nothing is asked and these rules do nothing.
- "opted-out": the public profile's MSC4258 field m.user_directory.visibility (or its
  unstable name fr.tchap.user_directory.visibility) says the user does not want to be
  found by our searchers; see `visibility_reason`.

The first three depend on configuration only: entries get them when they are created,
and `reevaluate` applies a changed configuration to every entry (a worker runs it when
it starts, beat every LISTING_SWEEP_INTERVAL_SECONDS). The others are facts a fetch
brings (user_directory.profile_visibility and account_status), combined with the
configuration whenever the entry's listing is computed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from sqlalchemy import Connection

from directory.storage import entries, inbox

if TYPE_CHECKING:
    from directory.config import Settings

SENDER = "sender"
NAMESPACE = "namespace"
EXCLUDED = "excluded"
DEACTIVATED = "deactivated"
SUPPORT = "support"
LOCKED = "locked"
GUEST = "guest"
OPTED_OUT = "opted-out"
# Reasons that come from configuration alone (the sweep recomputes them).
CONFIGURED = (SENDER, NAMESPACE, EXCLUDED)

# MSC4258's profile field, stable and unstable names (the stable one wins if both).
VISIBILITY_FIELD = "m.user_directory.visibility"
UNSTABLE_VISIBILITY_FIELD = "fr.tchap.user_directory.visibility"
# The values the proposal names; "federated" and "public" are the alternative names it
# floats for "remote". Anything else counts as no preference and is not stored.
HIDDEN, LOCAL, RESTRICTED, REMOTE = "hidden", "local", "restricted", "remote"
VISIBILITY_VALUES = frozenset({HIDDEN, LOCAL, RESTRICTED, REMOTE, "federated", "public"})

# Account states the admin API can report, most decisive first: a user is stored with
# the first that applies (a deactivated support user is "deactivated").
ACCOUNT_STATES = (DEACTIVATED, SUPPORT, GUEST, LOCKED)


class ListingConfigError(ValueError):
    """APPSERVICE_REGISTRATION_FILES or EXCLUDE_USER_REGEXES cannot be used."""


def visibility_value(raw: object) -> str | None:
    """The MSC4258 value a profile carries, if it is one we know."""
    return raw if isinstance(raw, str) and raw in VISIBILITY_VALUES else None


def profile_visibility(profile: dict) -> str | None:
    """The visibility a profile JSON object asks for (None: no known preference)."""
    if VISIBILITY_FIELD in profile:
        return visibility_value(profile[VISIBILITY_FIELD])
    return visibility_value(profile.get(UNSTABLE_VISIBILITY_FIELD))


def account_state(body: object) -> str | None:
    """What Synapse's GET /_synapse/admin/v2/users/<user_id> says that unlists a user:
    "deactivated", "support", "guest", "locked", or None (a normal account)."""
    if not isinstance(body, dict):
        return None
    # Synapse has sent deactivated both as a boolean and as 0/1.
    if body.get("deactivated") is True or body.get("deactivated") == 1:
        return DEACTIVATED
    if body.get("user_type") == "support":
        return SUPPORT
    # Synapse lists no guest (registering one adds no directory row).
    if body.get("is_guest") is True or body.get("is_guest") == 1:
        return GUEST
    if body.get("locked") is True or body.get("locked") == 1:
        return LOCKED
    return None


@dataclass(frozen=True)
class Namespace:
    """One source of unlisted users from another appservice's registration."""

    source: str  # the registration file
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class ListingRules:
    server_name: str
    sender: str
    # Other appservices' senders, with the file naming each.
    other_senders: dict[str, str] = field(default_factory=dict)
    namespaces: tuple[Namespace, ...] = ()
    excluded: tuple[re.Pattern[str], ...] = ()
    show_locked_users: bool = False

    def configured_reason(self, user_id: str) -> str | None:
        """Why configuration alone unlists the user (None: it does not)."""
        if user_id == self.sender:
            return SENDER
        if user_id in self.other_senders or self.namespace_of(user_id) is not None:
            return NAMESPACE
        if self.exclusion_of(user_id) is not None:
            return EXCLUDED
        return None

    def namespace_of(self, user_id: str) -> Namespace | None:
        for namespace in self.namespaces:
            # As Synapse: match, not fullmatch (its exclusive_user_regex.match).
            if namespace.pattern.match(user_id):
                return namespace
        return None

    def exclusion_of(self, user_id: str) -> re.Pattern[str] | None:
        return next((p for p in self.excluded if p.fullmatch(user_id)), None)

    def reason(self, user_id: str, visibility: str | None, account: str | None) -> str | None:
        """Why the entry is unlisted, from configuration and the facts fetches brought
        (None: listed). The first reason that applies, in the order of the module doc."""
        configured = self.configured_reason(user_id)
        if configured is not None:
            return configured
        if account in (DEACTIVATED, SUPPORT, GUEST):
            return account
        if account == LOCKED and not self.show_locked_users:
            return LOCKED
        if visibility_reason(visibility, is_local=self.is_local(user_id)) is not None:
            return OPTED_OUT
        return None

    def is_local(self, user_id: str) -> bool:
        return user_id.partition(":")[2] == self.server_name


def visibility_reason(visibility: str | None, *, is_local: bool) -> str | None:
    """Why an MSC4258 value keeps the user from our searchers, as a phrase for explain
    (None: it does not). Our searchers are users of our homeserver, so:

    - hidden: seen by nobody: unlisted.
    - local: seen only by users of their own homeserver: listed if they are ours,
      unlisted if they are a remote user.
    - restricted: seen only by users sharing a room with them. Search also shows a
      user in a public room (or anyone, with SEARCH_ALL_USERS) to strangers, and
      cannot yet hold one entry back from them: unlisted, failing closed (room mates
      still see them in their rooms).
    - remote (federated, public) or no value: listed, as without the field.
    """
    if visibility == HIDDEN:
        return "opted out of the directory"
    if visibility == LOCAL and not is_local:
        return "visible only to users of their own homeserver"
    if visibility == RESTRICTED:
        return "visible only to users sharing a room, which search cannot restrict to yet"
    return None


def split_regexes(value: str) -> list[str]:
    """EXCLUDE_USER_REGEXES: one regex per line, or comma-separated on one line (a
    regex with a comma in it needs the one-per-line form)."""
    parts = value.splitlines() if "\n" in value.strip() else value.split(",")
    return [part.strip() for part in parts if part.strip()]


def _compile(regex: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as exc:
        raise ListingConfigError(f"{where}: bad regex {regex!r}: {exc}") from exc


def _read_registration(path: str, server_name: str) -> tuple[str, list[Namespace]]:
    """An appservice registration's sender and exclusive user namespaces, checked as
    strictly as Synapse checks them when it loads the file."""
    where = f"APPSERVICE_REGISTRATION_FILES: {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ListingConfigError(f"{where}: cannot read it: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ListingConfigError(f"{where}: not YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ListingConfigError(f"{where}: not an appservice registration (no mapping)")
    localpart = data.get("sender_localpart")
    if not isinstance(localpart, str) or not localpart:
        raise ListingConfigError(f"{where}: no sender_localpart")
    namespaces = data.get("namespaces") or {}
    if not isinstance(namespaces, dict):
        raise ListingConfigError(f"{where}: namespaces is not a mapping")
    users = namespaces.get("users") or []
    if not isinstance(users, list):
        raise ListingConfigError(f"{where}: namespaces.users is not a list")
    found = []
    for index, entry in enumerate(users):
        if not isinstance(entry, dict):
            raise ListingConfigError(f"{where}: namespaces.users[{index}] is not a mapping")
        exclusive, regex = entry.get("exclusive"), entry.get("regex")
        if not isinstance(exclusive, bool) or not isinstance(regex, str):
            raise ListingConfigError(
                f"{where}: namespaces.users[{index}] needs a boolean exclusive and a string regex"
            )
        pattern = _compile(regex, f"{where}: namespaces.users[{index}]")
        if exclusive:
            found.append(Namespace(path, pattern))
    return f"@{localpart}:{server_name}", found


def load_rules(
    *,
    server_name: str,
    sender_localpart: str,
    registration_files: str,
    exclude_user_regexes: str,
    show_locked_users: bool,
) -> ListingRules:
    """The rules a configuration asks for; ListingConfigError says what is wrong."""
    other_senders: dict[str, str] = {}
    namespaces: list[Namespace] = []
    for path in (p.strip() for p in registration_files.split(",")):
        if not path:
            continue
        sender, found = _read_registration(path, server_name)
        other_senders.setdefault(sender, path)
        namespaces += found
    excluded = [
        _compile(regex, "EXCLUDE_USER_REGEXES") for regex in split_regexes(exclude_user_regexes)
    ]
    sender = f"@{sender_localpart}:{server_name}"
    # Our own registration may be among the files: its sender is "sender", not theirs.
    other_senders.pop(sender, None)
    return ListingRules(
        server_name=server_name,
        sender=sender,
        other_senders=other_senders,
        namespaces=tuple(namespaces),
        excluded=tuple(excluded),
        show_locked_users=show_locked_users,
    )


@lru_cache(maxsize=8)
def rules_for(settings: Settings) -> ListingRules:
    """The settings' rules, read once per process (restart to apply a changed file)."""
    return load_rules(
        server_name=settings.server_name,
        sender_localpart=settings.sender_localpart,
        registration_files=settings.appservice_registration_files,
        exclude_user_regexes=settings.exclude_user_regexes,
        show_locked_users=settings.show_locked_users,
    )


def configured_unlisted(rules: ListingRules, user_ids: Sequence[str]) -> dict[str, str]:
    """The new entries among these that configuration unlists, with why."""
    return {u: reason for u in user_ids if (reason := rules.configured_reason(u)) is not None}


# -- the sweep -------------------------------------------------------------------------

# Entries read, judged and written per transaction.
SWEEP_BATCH = 2000


def reevaluate(
    conn: Connection, rules: ListingRules, after: str | None, limit: int = SWEEP_BATCH
) -> tuple[str | None, int]:
    """Judge the next `limit` entries after user id `after` (locked, in user id order)
    against the rules, and write those whose listing changed. Returns the last user id
    judged (None: no entry was left) and how many changed.

    Under the inbox consumer's lock, as the prune: the consumer writes entries in no
    particular row order, and a batch of locked entries must not deadlock with it (a
    batch is short, so applying waits little)."""
    inbox.lock_consumer(conn)
    rows = entries.listing_rows(conn, after, limit)
    changed = {}
    for row in rows:
        reason = rules.reason(row.user_id, row.profile_visibility, row.account_status)
        if row.listed != (reason is None) or row.unlisted_reason != reason:
            changed[row.user_id] = reason
    entries.set_listing(conn, changed)
    return (rows[-1].user_id if rows else None), len(changed)


# -- explain ---------------------------------------------------------------------------


def describe(
    rules: ListingRules,
    user_id: str,
    reason: str,
    visibility: str | None,
    account: str | None,
) -> str:
    """Why an entry is unlisted, in words, for `explain`."""
    if reason == SENDER:
        return f"this appservice's own sender (SENDER_LOCALPART, {rules.sender})"
    if reason == NAMESPACE:
        if user_id in rules.other_senders:
            return f"the sender of another appservice ({rules.other_senders[user_id]})"
        namespace = rules.namespace_of(user_id)
        if namespace is not None:
            return (
                "in an exclusive user namespace of another appservice"
                f" ({namespace.source}: {namespace.pattern.pattern})"
            )
        return "in an exclusive user namespace of another appservice"
    if reason == EXCLUDED:
        pattern = rules.exclusion_of(user_id)
        suffix = f": {pattern.pattern}" if pattern is not None else ""
        return f"matches EXCLUDE_USER_REGEXES{suffix}"
    if reason == DEACTIVATED:
        return "a deactivated account (Synapse's admin API)"
    if reason == SUPPORT:
        return "a support user (user_type support, Synapse's admin API)"
    if reason == GUEST:
        return "a guest account (Synapse's admin API; Synapse lists no guests either)"
    if reason == LOCKED:
        return "a locked account (Synapse's admin API; SHOW_LOCKED_USERS=true lists them)"
    if reason == OPTED_OUT:
        why = visibility_reason(visibility, is_local=rules.is_local(user_id))
        return f"{why or 'opted out'} ({VISIBILITY_FIELD}={visibility})"
    return reason
