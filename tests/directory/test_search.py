"""Directory search on a real database: who can find whom, and what a term finds.

A searcher finds a listed entry only if its user is joined to a visible public room,
or shares a visible room with the searcher, or the server searches all users (then
never themself). Every word of the term (its first ten; case-insensitive, NFKC-folded,
split at punctuation) must be a prefix of a word of the user id or the public display
name, or a term of 3+ characters is contained in the display name or localpart
(infix); results rank exact id/localpart, exact name, id/localpart prefix, name prefix,
any other prefix match, then infix matches, local users first within a tier with
prefer_local_users, entries with a profile first, and a placeholder has no display name
(docs/design.md §8: scenarios 1, 2 and 10 at the search level). Hostile terms never fail.
On PostgreSQL the split, index-driven plan returns exactly what the single reference
query defines, the text match goes through the GIN index, words the full-text parser
cannot represent match exactly as on SQLite, and every statement has a time limit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, insert, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql import Select

from directory import search as search_module
from directory.db import make_engine
from directory.models import metadata, room_members, rooms, user_directory
from directory.search import (
    SearchHit,
    SearchResult,
    indexable_words,
    reference_statement,
    search_directory,
    search_queries,
)
from directory.text import entry_keys, normalise, search_words, split_user_id, words
from tests.conftest import SERVER_NAME

BOB = f"@bob:{SERVER_NAME}"
EVE = f"@eve:{SERVER_NAME}"
ALICE = "@alice:remote.test"
CAROL = "@carol:other.test"
NOW_MS = 1_700_000_000_000


class World:
    """Rooms, joins and public profiles, stored as the membership module keeps them:
    an entry for each user joined to a visible room, in_public_room derived."""

    def __init__(self) -> None:
        self.rooms: dict[str, tuple[bool, bool]] = {}
        self.members: dict[str, set[str]] = {}
        self.profiles: dict[str, tuple[str | None, str | None]] = {}
        self.unlisted: set[str] = set()

    def room(
        self, room_id: str, *members: str, public: bool | None = None, visible: bool | None = None
    ) -> World:
        """Create the room (private and visible unless told), or add members to it."""
        old_public, old_visible = self.rooms.get(room_id, (False, True))
        self.rooms[room_id] = (
            old_public if public is None else public,
            old_visible if visible is None else visible,
        )
        self.members.setdefault(room_id, set()).update(members)
        return self

    def profile(self, user_id: str, name: str | None = None, avatar: str | None = None) -> World:
        self.profiles[user_id] = (name, avatar)
        return self

    def unlist(self, *user_ids: str) -> World:
        """Held (their rooms still count) but never returned (directory/listing.py)."""
        self.unlisted.update(user_ids)
        return self

    def save(self, engine: Engine) -> None:
        with engine.begin() as conn:
            save_world(conn, self)


def save_world(conn: Connection, world: World) -> None:
    if world.rooms:
        conn.execute(
            insert(rooms),
            [
                {"room_id": r, "is_public": public, "is_visible": visible}
                for r, (public, visible) in world.rooms.items()
            ],
        )
    joins = [(r, u) for r, users in world.members.items() for u in sorted(users)]
    if joins:
        conn.execute(
            insert(room_members),
            [{"room_id": r, "user_id": u, "is_local": u.endswith(SERVER_NAME)} for r, u in joins],
        )
    listed: dict[str, bool] = {}
    for room_id, users in world.members.items():
        public, visible = world.rooms[room_id]
        if visible:
            for user_id in users:
                listed[user_id] = listed.get(user_id, False) or public
    if listed:
        conn.execute(
            insert(user_directory),
            [
                entry_row(
                    u,
                    *world.profiles.get(u, (None, None)),
                    public=p,
                    listed=u not in world.unlisted,
                )
                for u, p in listed.items()
            ],
        )


def entry_row(
    user_id: str, name: str | None, avatar: str | None, *, public: bool, listed: bool = True
) -> dict:
    return {
        "user_id": user_id,
        "server_name": split_user_id(user_id)[1],
        "display_name": name,
        "avatar_url": avatar,
        "fetched_at_ms": NOW_MS if name or avatar else None,
        "refresh_due_ms": NOW_MS + 86_400_000,
        "in_public_room": public,
        "listed": listed,
        "unlisted_reason": None if listed else "excluded",
        "created_at_ms": NOW_MS,
        **entry_keys(user_id, name),
    }


def search(engine: Engine, searcher: str, term: str, limit: int = 50, **kw: Any) -> SearchResult:
    with engine.connect() as conn:
        return search_directory(conn, searcher, term, limit, **kw)


def ids(engine: Engine, searcher: str, term: str, limit: int = 50, **kw: Any) -> list[str]:
    return [hit.user_id for hit in search(engine, searcher, term, limit, **kw).results]


@pytest.fixture
def pg(db: Engine) -> Engine:
    if db.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    return db


# --- visibility -------------------------------------------------------------------------


def test_sharing_a_private_room_is_what_makes_a_private_user_findable(db: Engine) -> None:
    """Scenario 10, first half."""
    World().room("!priv:x", BOB, ALICE).room("!other:x", EVE).profile(ALICE, "Alice").save(db)
    assert ids(db, BOB, "alice") == [ALICE]
    assert ids(db, EVE, "alice") == []
    assert ids(db, ALICE, "bob") == [BOB]


def test_public_room_members_are_findable_by_everyone(db: Engine) -> None:
    World().room("!pub:x", ALICE, public=True).room("!other:x", EVE).save(db)
    assert ids(db, EVE, "alice") == [ALICE]
    assert ids(db, "@stranger:nowhere.test", "alice") == [ALICE]


def test_a_room_we_cannot_see_is_shared_with_nobody(db: Engine) -> None:
    # Alice is listed through another visible room, but the room she shares with Eve
    # is not visible (no local user left in it): it counts for nothing.
    world = World().room("!gone:x", EVE, ALICE, visible=False).room("!priv:x", ALICE, CAROL)
    world.room("!eve:x", EVE).save(db)
    assert ids(db, EVE, "alice") == []
    assert ids(db, CAROL, "alice") == [ALICE]


def test_a_public_room_we_cannot_see_makes_nobody_public(db: Engine) -> None:
    world = World().room("!oldpub:x", ALICE, EVE, public=True, visible=False)
    world.room("!priv:x", ALICE, CAROL).room("!eve:x", EVE).save(db)
    assert ids(db, EVE, "alice") == []
    assert ids(db, ALICE, "eve") == []


def test_search_all_users_finds_everyone_listed(db: Engine) -> None:
    World().room("!priv:x", ALICE, CAROL).room("!eve:x", EVE).save(db)
    assert ids(db, EVE, "alice") == []
    assert ids(db, EVE, "alice", search_all_users=True) == [ALICE]
    assert ids(db, EVE, "remote", search_all_users=True) == [ALICE]


def test_the_searcher_finds_themself_unless_searching_all_users(db: Engine) -> None:
    """As in Synapse: search_all_users leaves the searcher out ("user_id != ?");
    otherwise a searcher in a public room is found like anyone else there, but a
    private room pairs the searcher with the others only, never with themself."""
    boba = "@boba:x.test"
    World().room("!priv:x", BOB, "@bobby:x.test").room("!pub:x", boba, public=True).save(db)
    assert ids(db, BOB, "bob") == [boba, "@bobby:x.test"]
    assert ids(db, "@bobby:x.test", "bob") == [BOB, boba]
    assert ids(db, boba, "bob") == [boba]
    assert ids(db, BOB, "bob", search_all_users=True) == [boba, "@bobby:x.test"]
    assert ids(db, boba, "bob", search_all_users=True) == [BOB, "@bobby:x.test"]


@pytest.mark.parametrize("all_users", [False, True])
def test_unlisted_entries_are_never_found(db: Engine, all_users: bool) -> None:
    """Public room, shared private room, search_all_users: an unlisted entry is held
    (its rooms still count) but no search returns it."""
    world = World().room("!pub:x", ALICE, "@alicia:x.test", public=True)
    world.room("!priv:x", BOB, "@alison:x.test", "@alina:x.test")
    world.profile(ALICE, "Alice").profile("@alina:x.test", "Alina")
    world.unlist(ALICE, "@alison:x.test").save(db)
    # Alina has a profile: first.
    assert ids(db, BOB, "ali", search_all_users=all_users) == ["@alina:x.test", "@alicia:x.test"]
    assert ids(db, BOB, ALICE, search_all_users=all_users) == []
    assert ids(db, BOB, "alison", search_all_users=all_users) == []
    # Infix matches too: "lis" is inside "alison" and "alicia" only by infix.
    assert ids(db, BOB, "lis", search_all_users=all_users) == []
    assert ids(db, BOB, "lic", search_all_users=all_users) == ["@alicia:x.test"]
    # Nothing to find: limit 0 says so too.
    assert search(db, BOB, "alison", 0, search_all_users=all_users).limited is False
    # The unlisted still see others (their rooms count): Alison shares a room with Bob.
    assert ids(db, "@alison:x.test", "bob") == [BOB]


def test_exclude_remote_users_returns_only_our_users(db: Engine) -> None:
    local = f"@alina:{SERVER_NAME}"
    world = World().room("!pub:x", ALICE, local, "@alex:elsewhere.test", public=True)
    world.room("!priv:x", BOB, "@al:remote.test").save(db)
    assert set(ids(db, BOB, "al")) == {"@al:remote.test", ALICE, local, "@alex:elsewhere.test"}
    for all_users in (False, True):
        assert ids(db, BOB, "al", exclude_remote_users=True, search_all_users=all_users) == [local]
    # Our server name is the searcher's unless told.
    assert ids(db, BOB, "al", exclude_remote_users=True, server_name="remote.test") == [
        "@al:remote.test",
        ALICE,
    ]


def test_prefer_local_users_ranks_ours_first_within_a_tier(db: Engine) -> None:
    local_a, local_b = f"@annette:{SERVER_NAME}", f"@anders:{SERVER_NAME}"
    everyone_public(
        db,
        {
            "@ann:remote.test": "Ann",  # tier 0, remote
            "@anna:remote.test": "Anna",  # tier 2, remote, with a profile
            local_a: None,  # tier 2, local placeholder
            local_b: "Zed",  # tier 2, local
            "@bo:remote.test": "Brianna",  # tier 5 (infix), remote
            f"@jo:{SERVER_NAME}": "Joanna",  # tier 5 (infix), local
        },
    )
    assert ids(db, EVE, "ann") == [
        "@ann:remote.test",
        "@anna:remote.test",
        local_a,
        "@bo:remote.test",  # "brianna" < "joanna"
        f"@jo:{SERVER_NAME}",
    ]
    preferred = [
        "@ann:remote.test",  # a better tier still wins
        local_a,  # local first within tier 2, then profile first, by localpart
        "@anna:remote.test",
        f"@jo:{SERVER_NAME}",
        "@bo:remote.test",
    ]
    assert ids(db, EVE, "ann", prefer_local_users=True) == preferred
    assert ids(db, EVE, "an", prefer_local_users=True) == [
        local_b,
        local_a,
        "@ann:remote.test",
        "@anna:remote.test",
    ]


def test_a_room_turning_private_and_public_again_changes_who_finds_whom(db: Engine) -> None:
    """Scenario 10, second half, as the membership module records the switch."""
    World().room("!r:x", ALICE, BOB, public=True).room("!eve:x", EVE).save(db)
    assert ids(db, EVE, "alice") == [ALICE]

    def set_public(value: bool) -> None:
        with db.begin() as conn:
            conn.execute(update(rooms).where(rooms.c.room_id == "!r:x").values(is_public=value))
            conn.execute(
                update(user_directory)
                .where(user_directory.c.user_id.in_([ALICE, BOB]))
                .values(in_public_room=value)
            )

    set_public(False)
    assert ids(db, EVE, "alice") == []
    assert ids(db, BOB, "alice") == [ALICE]
    set_public(True)
    assert ids(db, EVE, "alice") == [ALICE]


# --- matching ---------------------------------------------------------------------------


def everyone_public(engine: Engine, profiles: dict[str, str | None]) -> None:
    world = World().room("!pub:x", *profiles, public=True)
    for user_id, name in profiles.items():
        world.profile(user_id, name)
    world.save(engine)


def test_matching_ignores_case(db: Engine) -> None:
    everyone_public(db, {ALICE: "Alice Smith"})
    for term in ("alice", "ALICE", "aLiCe", "SMITH", "Al", "@ALICE:REMOTE.TEST"):
        assert ids(db, EVE, term) == [ALICE], term


def test_localpart_user_id_and_display_name_words_match_by_prefix(db: Engine) -> None:
    everyone_public(db, {ALICE: "Wonder Land", CAROL: None})
    assert ids(db, EVE, "ali") == [ALICE]
    assert ids(db, EVE, "@alice:remote.test") == [ALICE]
    assert ids(db, EVE, "alice:remote") == [ALICE]
    assert ids(db, EVE, "remote.te") == [ALICE]
    assert ids(db, EVE, "wond") == [ALICE]
    assert ids(db, EVE, "lan") == [ALICE]
    assert ids(db, EVE, "car") == [CAROL]


def test_every_word_of_the_term_must_match(db: Engine) -> None:
    everyone_public(db, {ALICE: "Alice Smith", CAROL: "Alice Jones", "@dan:hs2": "Dan"})
    assert ids(db, EVE, "ali smi") == [ALICE]
    assert ids(db, EVE, "smi ali") == [ALICE]
    assert ids(db, EVE, "alice jones") == [CAROL]
    assert ids(db, EVE, "alice dan") == []
    # Punctuation separates words: "@alice:hs2" asks for "alice" and "hs2".
    assert ids(db, EVE, "@alice:hs2") == []
    assert ids(db, EVE, "@dan:hs2") == ["@dan:hs2"]


def test_words_match_from_their_start_and_longer_terms_also_inside(db: Engine) -> None:
    """Synapse matches word prefixes only ("lex" never finds "alex", synapse#13807).
    Here a term of 3+ characters also finds the names and localparts containing it,
    after every prefix match; shorter terms match by prefix only."""
    everyone_public(db, {ALICE: "Cordelia", CAROL: "Delia", "@alex:x.test": None})
    assert ids(db, EVE, "delia") == [CAROL, ALICE]
    assert ids(db, EVE, "elia") == [ALICE, CAROL]  # both infix: by name
    assert ids(db, EVE, "lice") == [ALICE]  # inside the localpart
    assert ids(db, EVE, "lex") == ["@alex:x.test"]
    assert ids(db, EVE, "@lex") == ["@alex:x.test"]
    assert ids(db, EVE, "le") == []  # too short for infix
    assert ids(db, EVE, "el") == []
    # The whole term is the infix, punctuation and spaces included.
    assert ids(db, EVE, "r delia") == []
    world = World().room("!pub2:x", "@x1:x.test", "@x2:x.test", public=True)
    world.profile("@x1:x.test", "Mary-Ann Lee").profile("@x2:x.test", "Maryanne").save(db)
    assert ids(db, EVE, "ryan") == ["@x2:x.test"]
    assert ids(db, EVE, "y-ann l") == ["@x1:x.test"]
    assert ids(db, EVE, "ann") == ["@x1:x.test", "@x2:x.test"]  # a prefix match first


def test_infix_matches_rank_after_every_prefix_match(db: Engine) -> None:
    everyone_public(
        db,
        {
            "@zz:x.test": "Shannah",  # 5: contains "han"
            "@aa:x.test": "Johan",  # 5
            "@yy:x.test": "Bo Hanson",  # 4: a word starts with "han"
            "@hank:x.test": None,  # 2, a placeholder
            "@ethan:x.test": None,  # 5 by localpart
        },
    )
    assert ids(db, EVE, "han") == [
        "@hank:x.test",
        "@yy:x.test",
        "@aa:x.test",  # "johan" < "shannah"
        "@zz:x.test",
        "@ethan:x.test",  # no profile: last within its tier
    ]
    # The tier boundary holds under a small limit.
    assert ids(db, EVE, "han", 2) == ["@hank:x.test", "@yy:x.test"]
    assert search(db, EVE, "han", 4).limited is True


def test_a_placeholder_has_no_display_name_and_is_found_by_its_user_id(db: Engine) -> None:
    """Scenario 2: a user first seen in a public room is found at once by user id; it
    has no public name (the client shows the user id)."""
    everyone_public(db, {ALICE: None})
    assert search(db, EVE, ALICE) == SearchResult(
        results=[SearchHit(user_id=ALICE, display_name=None, avatar_url=None)], limited=False
    )
    assert ids(db, EVE, "alice") == [ALICE]


def test_only_the_public_profile_is_shown_and_found(db: Engine) -> None:
    """Scenario 1: Alice's per-room "Delia" never reached the directory."""
    World().room("!priv:x", BOB, ALICE).room("!pub:x", ALICE, EVE, public=True).profile(
        ALICE, "Alice", "mxc://remote.test/a"
    ).save(db)
    expected = [SearchHit(user_id=ALICE, display_name="Alice", avatar_url="mxc://remote.test/a")]
    assert search(db, EVE, ALICE).results == expected
    assert search(db, BOB, "alice").results == expected
    assert ids(db, EVE, "delia") == []
    assert ids(db, BOB, "delia") == []


def test_unicode_is_folded_but_accents_are_kept(db: Engine) -> None:
    everyone_public(
        db,
        {
            "@zoe:x.test": "Zoë",
            "@sigrid:x.test": "Straße",
            "@fi:x.test": "ﬁona",
            "@kim:x.test": "김",
        },
    )
    assert ids(db, EVE, "zoë") == ["@zoe:x.test"]
    assert ids(db, EVE, "ZOË") == ["@zoe:x.test"]
    # The localpart "zoe" matches; the name "Zoë" does not match "zoe" (NFKC keeps
    # accents), so a name-only search with the plain letter finds nothing.
    assert ids(db, EVE, "zoe") == ["@zoe:x.test"]
    assert ids(db, EVE, "zo") == ["@zoe:x.test"]
    assert ids(db, EVE, "STRASSE") == ["@sigrid:x.test"]  # casefold: ß is ss
    assert ids(db, EVE, "fiona") == ["@fi:x.test"]  # NFKC: the ligature is f + i
    assert ids(db, EVE, "김") == ["@kim:x.test"]


# --- ranking ----------------------------------------------------------------------------


def test_results_rank_by_tier(db: Engine) -> None:
    everyone_public(
        db,
        {
            "@k:x.test": "Mary Ann",  # 4: another word matches
            "@q:x.test": "Anneliese",  # 3: name starts with the term
            "@annabel:x.test": "Zed",  # 2: localpart starts with the term
            "@zed:x.test": "Ann",  # 1: name equals the term
            "@ann:x.test": "Zed",  # 0: localpart equals the term
            "@nobody:x.test": "Someone",
        },
    )
    expected = ["@ann:x.test", "@zed:x.test", "@annabel:x.test", "@q:x.test", "@k:x.test"]
    assert ids(db, EVE, "ann") == expected
    assert ids(db, EVE, "ANN") == expected
    # A leading '@' is the start of a user id, not part of it.
    assert ids(db, EVE, "@ann") == expected


def test_the_real_user_id_outranks_a_name_copying_it(db: Engine) -> None:
    everyone_public(db, {"@mallory:evil.test": ALICE, ALICE: "Alice"})
    assert ids(db, EVE, ALICE) == [ALICE, "@mallory:evil.test"]
    assert ids(db, EVE, "@alice:remote.te") == [ALICE, "@mallory:evil.test"]


def test_within_a_tier_entries_with_a_profile_come_first_then_by_name(db: Engine) -> None:
    world = World().room(
        "!pub:x", "@a1:x.test", "@a2:x.test", "@a3:x.test", "@a4:x.test", public=True
    )
    world.profile("@a1:x.test", None)  # placeholder
    world.profile("@a2:x.test", None, "mxc://x.test/avatar")  # avatar, no name
    world.profile("@a3:x.test", "Zara Common")
    world.profile("@a4:x.test", "Abe Common")
    world.save(db)
    # All tier 4 (the word "test" of the server name); profiles first, named by name,
    # then the nameless, then the placeholder.
    assert ids(db, EVE, "test") == ["@a4:x.test", "@a3:x.test", "@a2:x.test", "@a1:x.test"]
    # Tier 2 (localparts start with "a"): by localpart within each profile group.
    assert ids(db, EVE, "a") == ["@a2:x.test", "@a3:x.test", "@a4:x.test", "@a1:x.test"]


def test_names_order_by_code_point(db: Engine) -> None:
    everyone_public(db, {"@u1:x.test": "beta b", "@u2:x.test": "Bé", "@u3:x.test": "Beta a"})
    # Casefolded, then by code point on every backend: "beta a" < "beta b" < "bé"
    # (a locale collation would put "bé" first).
    assert ids(db, EVE, "b") == ["@u3:x.test", "@u1:x.test", "@u2:x.test"]


# --- limit ------------------------------------------------------------------------------


def test_limit_and_limited(db: Engine) -> None:
    everyone_public(db, {f"@user{i}:x.test": f"User {i}" for i in range(5)})
    assert search(db, EVE, "user", 5).limited is False
    assert len(search(db, EVE, "user", 5).results) == 5
    cut = search(db, EVE, "user", 3)
    assert cut.limited is True
    assert [h.user_id for h in cut.results] == [f"@user{i}:x.test" for i in range(3)]


@pytest.mark.parametrize("all_users", [False, True])
def test_limit_zero_still_says_whether_anything_matches(db: Engine, all_users: bool) -> None:
    everyone_public(db, {"@user1:x.test": "User 1", "@private:x.test": None})
    World().room("!priv:x", EVE, "@hidden:x.test").save(db)
    for limit in (0, -1):
        found = search(db, EVE, "user", limit, search_all_users=all_users)
        assert found == SearchResult(results=[], limited=True)
        # An infix-only match counts.
        assert search(db, EVE, "ser1", limit, search_all_users=all_users).limited is True
        # Only through the shared private room.
        assert search(db, EVE, "hidden", limit, search_all_users=all_users).limited is True
        assert search(db, EVE, "nobody", limit, search_all_users=all_users) == SearchResult(
            results=[], limited=False
        )


@pytest.mark.parametrize("term", ["", "   ", "!!!", "@", "@:", "...", "\x00", "_%", "'\"\\"])
def test_a_term_without_words_finds_nothing(db: Engine, term: str) -> None:
    everyone_public(db, {ALICE: "Alice"})
    assert search(db, EVE, term) == SearchResult(results=[], limited=False)


# --- hostile terms ----------------------------------------------------------------------

HOSTILE_TERMS = [
    "'",
    "alice'",
    "o'brien",
    "a''b",
    '"alice"',
    "alice & bob",
    "alice | bob",
    "!alice",
    "alice:*",
    ":*",
    "(alice",
    "alice <-> bob",
    "\\",
    "alice\\",
    "%",
    "a%",
    "_",
    "a_b",
    "alice\x00bob",
    "\ud800alice",
    "a" * 10_000,
    "ﷺ" * 600,
    "@" * 600 + "alice",
    "alice " * 200,
    " ".join(f"w{i}" for i in range(300)),
    "🙂 alice",
    "\u202ealice",
]


@pytest.mark.parametrize("term", HOSTILE_TERMS, ids=range(len(HOSTILE_TERMS)))
@pytest.mark.parametrize("all_users", [False, True])
def test_hostile_terms_never_fail(db: Engine, term: str, all_users: bool) -> None:
    everyone_public(db, {ALICE: "Alice", "@bob:x.test": "Bob", "@obrien:x.test": "O'Brien"})
    result = search(db, EVE, term, 10, search_all_users=all_users)
    assert len(result.results) <= 10


def test_hostile_terms_match_their_words_literally(db: Engine) -> None:
    everyone_public(
        db,
        {
            ALICE: "Alice",
            "@bob:x.test": "Bob",
            "@obrien:x.test": "O'Brien",
            "@a_b:x.test": None,
            "@a1:x.test": "a%b",
        },
    )
    assert ids(db, EVE, "o'brien") == ["@obrien:x.test"]
    assert ids(db, EVE, "alice & bob") == []  # AND, never tsquery syntax
    assert ids(db, EVE, "alice | bob") == []
    assert ids(db, EVE, "!alice") == [ALICE]
    assert ids(db, EVE, "alice:*") == [ALICE]
    assert ids(db, EVE, "alice\x00") == [ALICE]
    assert ids(db, EVE, "\ud800alice") == [ALICE]
    # LIKE wildcards are plain characters: "a_b" is the words "a" and "b", and "a%"
    # the word "a"; neither stands for "any character".
    assert ids(db, EVE, "a_b") == ["@a_b:x.test", "@a1:x.test"]
    assert set(ids(db, EVE, "a%")) == {ALICE, "@a_b:x.test", "@a1:x.test"}
    assert ids(db, EVE, "a" * 10_000) == []


# --- PostgreSQL plans ---------------------------------------------------------------------


def explain(conn: Connection, statement: Select) -> str:
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    rows = conn.exec_driver_sql("EXPLAIN " + compiled.string, compiled.params)
    return "\n".join(row[0] for row in rows)


def generated_world(count: int, seed: int = 1) -> World:
    """Many users with overlapping names, on a few servers, in public and private rooms."""
    rnd = random.Random(seed)
    syllables = ["ka", "ri", "mo", "an", "el", "jo", "sa", "li", "be", "to", "na", "vi"]

    def word() -> str:
        return "".join(rnd.choice(syllables) for _ in range(rnd.randint(1, 3)))

    world = World().room("!searcher:x", BOB).room("!pub:x", public=True)
    servers = ["matrix.test", "remote.test", "hs1.test", "hs2.test"]
    for i in range(count):
        user_id = f"@{word()}{rnd.choice(['', '.', '_'])}{word()}{i}:{rnd.choice(servers)}"
        shape = rnd.random()
        if shape < 0.6:
            world.profile(user_id, f"{word().title()} {word().title()}", None)
        elif shape < 0.75:
            world.profile(user_id, word(), f"mxc://x/{i}")
        elif shape < 0.8:
            world.profile(user_id, None, f"mxc://x/{i}")
        if rnd.random() < 0.05:
            world.unlist(user_id)
        place = rnd.random()
        if place < 0.5:
            world.room("!pub:x", user_id)
        elif place < 0.6:
            world.room("!searcher:x", user_id)
        else:
            world.room(f"!priv{i % 50}:x", user_id)
    return world


ORDER_INDEXES = ("ix_user_directory_name_order", "ix_user_directory_localpart_order")
TRIGRAM_INDEXES = ("ix_user_directory_name_key_trgm", "ix_user_directory_localpart_key_trgm")


@contextmanager
def analysed(engine: Engine, world: World, *, indexes: bool = True) -> Iterator[Connection]:
    """The world in a transaction that is rolled back, with fresh planner statistics;
    without the search order indexes of migration 0003 and the trigram indexes of 0008
    if `indexes` is false (the result must not depend on the plan)."""
    with engine.connect() as conn, conn.begin() as transaction:
        save_world(conn, world)
        if not indexes:
            for index in ORDER_INDEXES + TRIGRAM_INDEXES:
                conn.execute(text(f"DROP INDEX {index}"))
        conn.execute(text("ANALYZE user_directory"))
        conn.execute(text("ANALYZE room_members"))
        conn.execute(text("ANALYZE rooms"))
        try:
            yield conn
        finally:
            transaction.rollback()


def test_the_text_match_can_use_the_gin_index(pg: Engine) -> None:
    everyone_public(pg, {ALICE: "Alice", CAROL: "Carol", BOB: "Bob"})
    queries = search_queries(BOB, "alice", 10)
    assert queries is not None
    with pg.connect() as conn, conn.begin() as transaction:
        # Only the text index and the table: can the match use the index at all?
        for index in ORDER_INDEXES:
            conn.execute(text(f"DROP INDEX {index}"))
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = explain(conn, queries.rest)
        transaction.rollback()
    assert "ix_user_directory_search_words" in plan, plan


@pytest.mark.parametrize("all_users", [False, True])
def test_a_selective_term_is_looked_up_in_the_gin_index(pg: Engine, all_users: bool) -> None:
    world = generated_world(3000).room("!pub:x", ALICE).profile(ALICE, "Quixotic Alice")
    assert world.rooms["!pub:x"] == (True, True)
    with analysed(pg, world) as conn:
        queries = search_queries(BOB, "quixotic", 10, search_all_users=all_users)
        assert queries is not None
        plan = explain(conn, queries.rest)
        assert "ix_user_directory_search_words" in plan, plan
        assert "Seq Scan on user_directory" not in plan, plan
        assert [h.user_id for h in search_directory(conn, BOB, "quixotic", 10).results] == [ALICE]


def test_with_the_order_indexes_a_short_prefix_reads_ranges_in_order(pg: Engine) -> None:
    with analysed(pg, generated_world(3000)) as conn:
        queries = search_queries(BOB, "ka", 10)
        assert queries is not None
        plan = explain(conn, queries.leading)
        assert "Index Scan using ix_user_directory_localpart_order" in plan, plan
        assert "Index Scan using ix_user_directory_name_order" in plan, plan
        assert "Seq Scan on user_directory" not in plan, plan
        for term in ("ka", "k", "@alice:remote.test", "matrix"):
            found = search_directory(conn, BOB, term, 10)
            assert found == reference_result(conn, BOB, term, 10, False), term


def reference_result(
    conn: Connection, searcher: str, term: str, limit: int, all_users: bool, **options: Any
) -> SearchResult:
    statement = reference_statement(
        conn.dialect.name, searcher, term, limit, search_all_users=all_users, **options
    )
    if statement is None:
        return SearchResult(results=[], limited=False)
    rows = conn.execute(statement).all()
    limit = max(limit, 0)
    return SearchResult(
        results=[SearchHit(r.user_id, r.display_name, r.avatar_url) for r in rows[:limit]],
        limited=len(rows) > limit,
    )


def sample_terms(world: World, count: int, seed: int = 2) -> list[str]:
    rnd = random.Random(seed)
    users = sorted(u for members in world.members.values() for u in members)
    terms = ["k", "ka", "matrix", "test", "hs1", "@", "@ka", "zzz", "ka ri", "remote.te"]
    for user_id in rnd.sample(users, count):
        name = world.profiles.get(user_id, (None, None))[0]
        terms += [user_id, user_id[: rnd.randint(2, len(user_id))], user_id.split(":")[0]]
        if name:
            terms += [name, name[: rnd.randint(1, len(name))], name.split()[-1][:3]]
            # Infixes: from inside the name or the localpart.
            start = rnd.randint(1, max(1, len(name) - 3))
            terms.append(name[start : start + rnd.randint(3, 5)])
        localpart = user_id[1:].split(":")[0]
        start = rnd.randint(1, max(1, len(localpart) - 3))
        terms.append(localpart[start : start + rnd.randint(3, 4)])
    return terms


# Server-side options and the limits that make branches overflow into one another.
OPTION_SETS: list[dict[str, Any]] = [
    {},
    {"exclude_remote_users": True, "server_name": "matrix.test"},
    {"prefer_local_users": True, "server_name": "matrix.test"},
]


@pytest.mark.parametrize("indexes", [False, True], ids=["without-order-indexes", "migrated"])
def test_the_postgresql_plan_returns_what_the_reference_query_defines(
    pg: Engine, indexes: bool
) -> None:
    world = generated_world(1500, seed=3)
    # Small limits make the tier branches overflow into one another; limit 0 must
    # still say whether anything matches.
    # The options change the branches, not how a branch reads its index: they are
    # checked with the indexes only, to keep the test short.
    option_sets = OPTION_SETS if indexes else OPTION_SETS[:1]
    with analysed(pg, world, indexes=indexes) as conn:
        for term in sample_terms(world, 15):
            for all_users in (False, True):
                for options in option_sets:
                    for limit in (0, 1, 4):
                        expected = reference_result(conn, BOB, term, limit, all_users, **options)
                        got = search_directory(
                            conn, BOB, term, limit, search_all_users=all_users, **options
                        )
                        assert got == expected, (term, all_users, options, limit)


# --- the word cap, infix plans, the statement timeout ----------------------------------


def test_only_the_first_ten_words_count(db: Engine) -> None:
    """Like Synapse on PostgreSQL (_parse_query_postgres): the words after the tenth
    are ignored, so a pasted paragraph costs no more than a name."""
    name = " ".join(f"w{i}" for i in range(10))
    everyone_public(db, {ALICE: name})
    assert ids(db, EVE, name + " nomatch") == [ALICE]
    assert ids(db, EVE, "nomatch " + name) == []
    # Counted before repeated words are merged, as Synapse counts them.
    assert ids(db, EVE, "w1 " * 10 + "nomatch") == [ALICE]
    assert ids(db, EVE, "w1 " * 9 + "nomatch") == []


def test_an_infix_is_looked_up_in_the_trigram_index(pg: Engine) -> None:
    world = generated_world(3000).room("!pub:x", ALICE).profile(ALICE, "Quixotic Alice")
    with analysed(pg, world) as conn:
        queries = search_queries(BOB, "xoti", 10)
        assert queries is not None and queries.infix is not None
        # Without the order indexes, a scan of the table is all that is left.
        for index in ORDER_INDEXES:
            conn.execute(text(f"DROP INDEX {index}"))
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        plan = explain(conn, queries.infix)
        conn.execute(text("SET LOCAL enable_seqscan = on"))
        assert "ix_user_directory_name_key_trgm" in plan, plan
        assert "ix_user_directory_localpart_key_trgm" in plan, plan
        assert "Seq Scan on user_directory" not in plan, plan
        found = search_directory(conn, BOB, "xoti", 10)
        assert [h.user_id for h in found.results] == [ALICE]
    # Too short for trigrams: no infix branch at all.
    short = search_queries(BOB, "xo", 10)
    assert short is not None and short.infix is None


def test_a_common_infix_ranks_a_bounded_share_of_its_matches(
    pg: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL tier 5 sorts at most INFIX_CANDIDATES of the entries the trigram
    indexes find: each one shown still contains the term and follows every prefix
    match; below the bound (a small directory) the tier is exact."""
    inside = {f"@u{i}:x.test": f"Flexer {i}" for i in range(8)}
    everyone_public(pg, {**inside, "@lexi:x.test": "Lexi"})
    exact = ids(pg, EVE, "lex", 5)
    assert exact == ["@lexi:x.test", *sorted(inside, key=lambda u: inside[u])[:4]]
    monkeypatch.setattr(search_module, "INFIX_CANDIDATES", 3)
    capped = search(pg, EVE, "lex", 5)
    found = [h.user_id for h in capped.results]
    assert found[0] == "@lexi:x.test"
    # At most 3 candidates (Lexi, a prefix match, may be one of them): fewer than the 4
    # the exact tier gave, each containing the term.
    assert 1 <= len(found[1:]) <= 3 and set(found[1:]) <= set(inside)
    assert search(pg, EVE, "lex", 2).limited is True


def test_search_statements_run_under_the_statement_timeout(pg: Engine) -> None:
    """SEARCH_STATEMENT_TIMEOUT_MS holds for the search's own transaction (the API
    answers QueryCanceled with 503), and ends with it."""
    everyone_public(pg, {ALICE: "Alice"})
    with pg.connect() as conn:
        default = conn.execute(text("SHOW statement_timeout")).scalar()
        conn.rollback()
        search_directory(conn, EVE, "alice", 10, statement_timeout_ms=1500)
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "1500ms"
        conn.rollback()
        assert conn.execute(text("SHOW statement_timeout")).scalar() == default
        conn.rollback()
        assert ids(pg, EVE, "alice") == [ALICE]  # 0: no limit set
        search_directory(conn, EVE, "alice", 10, statement_timeout_ms=50)
        with pytest.raises(OperationalError) as raised:
            conn.execute(text("SELECT pg_sleep(2)"))
        assert isinstance(raised.value.orig, psycopg.errors.QueryCanceled)


# --- words PostgreSQL's text search cannot represent ------------------------------------

# Names holding characters Python's \w and PostgreSQL's text search parser disagree
# about: U+0BF0 TAMIL NUMBER TEN and U+0F33 (No: words to Python, dropped by the
# parser), ½ and ² (NFKC turns them into digits), runic and Roman numerals (Nl),
# combining marks, an enclosing mark, emoji, Devanagari vowel signs, U+3007.
ODD_NAMES = {
    "@u01:x.test": "ab\u0bf0cd",
    "@u02:x.test": "\u0bf0",
    "@u03:x.test": "Alice \u0bf0",
    "@u04:x.test": "Alice",
    "@u05:x.test": "x\u0f33y",
    "@u06:x.test": "q\u0301r",
    "@u07:x.test": "\U0001f642 smile",
    "@u08:x.test": "smile\U0001f642",
    "@u09:x.test": "\u0939\u093f\u0928\u094d\u0926\u0940",
    "@u10:x.test": "ab cd",
    "@u11:x.test": "\u16eeab",
    "@u12:x.test": "cd\u3007",
    "@u13:x.test": "\u216b x",
    "@u14:x.test": "xii \u00bd",
    "@u15:x.test": "a\u00b2 b",
    "@u16:x.test": "x\u20ddy \u0bf0\u0bf1",
}
ODD_TERMS = [
    "\u0bf0",
    "\u0bf0\u0bf1",
    "alice \u0bf0",
    "\u0bf0 alice",
    "ab\u0bf0",
    "ab\u0bf0cd",
    "ab",
    "cd",
    "\u0f33",
    "x\u0f33",
    "x\u0f33y",
    "q\u0301",
    "q\u0301r",
    "\u0301",
    "\U0001f642",
    "smile \U0001f642",
    "\u16ee",
    "\u16eea",
    "\u216b",
    "xii",
    "\u0939\u093f",
    "\u0928",
    "\u3007",
    "cd\u3007",
    "d\u3007",
    "\u00bd",
    "1 2",
    "a2",
    "\u00b2",
    "x\u20ddy",
    "y \u0bf1",
]


def expected_matches(term: str) -> set[str]:
    """The definition, in Python: every word (of the first ten) starts a stored word,
    or the term (3+ characters) is inside the name or the localpart."""
    term_ws = words(term)[:10]
    whole = normalise(term).strip()
    bare = whole.removeprefix("@")
    if not term_ws:
        return set()
    bare_is_localpart = ":" not in bare and not any(c.isspace() for c in bare)
    found = set()
    for user_id, name in ODD_NAMES.items():
        stored = search_words(user_id, name).split()
        by_prefix = all(any(s.startswith(w) for s in stored) for w in term_ws)
        in_name = any(len(k) >= 3 and k in normalise(name) for k in (whole, bare))
        in_localpart = len(bare) >= 3 and bare_is_localpart and bare in split_user_id(user_id)[0]
        if by_prefix or in_name or in_localpart:
            found.add(user_id)
    return found


@pytest.mark.parametrize("term", ODD_TERMS, ids=range(len(ODD_TERMS)))
def test_words_the_full_text_parser_drops_never_widen_the_search(db: Engine, term: str) -> None:
    everyone_public(db, ODD_NAMES)
    assert set(ids(db, EVE, term)) == expected_matches(term)


def test_postgresql_and_sqlite_agree_on_odd_characters(pg: Engine, tmp_path: Any) -> None:
    """Row for row, the same search on PostgreSQL and on a SQLite database holding the
    same entries."""
    everyone_public(pg, ODD_NAMES)
    lite = make_engine(f"sqlite:///{tmp_path / 'odd.sqlite3'}")
    try:
        metadata.create_all(lite)
        everyone_public(lite, ODD_NAMES)
        for term in ODD_TERMS:
            for limit in (0, 1, 50):
                assert search(pg, EVE, term, limit) == search(lite, EVE, term, limit), term
    finally:
        lite.dispose()


def test_only_words_the_parser_keeps_are_looked_up_in_the_index(pg: Engine) -> None:
    with pg.connect() as conn:
        assert indexable_words(conn, ["alice", "\u0bf0", "ab\u0bf0cd", "\u16ee", "x"]) == {
            "alice",
            "\u16ee",
            "x",
        }
    # No word the index can look up: LIKE alone decides.
    queries = search_queries(EVE, "\u0bf0", 10, indexable=set())
    assert queries is not None
    compiled = str(queries.rest.compile(dialect=pg.dialect))
    assert "to_tsquery" not in compiled and "LIKE" in compiled
