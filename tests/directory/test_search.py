"""Directory search on a real database: who can find whom, and what a term finds.

A searcher finds an entry only if its user is joined to a visible public room, or
shares a visible room with the searcher, or the server searches all users. Every word
of the term (case-insensitive, NFKC-folded, split at punctuation) must be a prefix of
a word of the user id or the public display name; results rank exact id/localpart,
exact name, id/localpart prefix, name prefix, then any other match, entries with a
profile first within a tier, and a placeholder shows its user id as its name
(docs/design.md §8: scenarios 1, 2 and 10 at the search level). Hostile terms never fail.
On PostgreSQL the split, index-driven plan returns exactly what the single reference
query defines, and the text match goes through the GIN index.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Connection, Engine, insert, text, update
from sqlalchemy.sql import Select

from directory.models import room_members, rooms, user_directory
from directory.search import (
    SearchHit,
    SearchResult,
    reference_statement,
    search_directory,
    search_queries,
)
from directory.text import entry_keys, split_user_id
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
                entry_row(u, *world.profiles.get(u, (None, None)), public=p)
                for u, p in listed.items()
            ],
        )


def entry_row(user_id: str, name: str | None, avatar: str | None, *, public: bool) -> dict:
    return {
        "user_id": user_id,
        "server_name": split_user_id(user_id)[1],
        "display_name": name,
        "avatar_url": avatar,
        "fetched_at_ms": NOW_MS if name or avatar else None,
        "refresh_due_ms": NOW_MS + 86_400_000,
        "in_public_room": public,
        "created_at_ms": NOW_MS,
        **entry_keys(user_id, name),
    }


def search(engine: Engine, searcher: str, term: str, limit: int = 50, **kw: bool) -> SearchResult:
    with engine.connect() as conn:
        return search_directory(conn, searcher, term, limit, **kw)


def ids(engine: Engine, searcher: str, term: str, limit: int = 50, **kw: bool) -> list[str]:
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


def test_the_searcher_finds_themself(db: Engine) -> None:
    World().room("!priv:x", BOB).save(db)
    assert ids(db, BOB, "bob") == [BOB]


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


def test_words_match_from_their_start_only(db: Engine) -> None:
    everyone_public(db, {ALICE: "Cordelia", CAROL: "Delia"})
    assert ids(db, EVE, "delia") == [CAROL]
    assert ids(db, EVE, "elia") == []
    assert ids(db, EVE, "lice") == []


def test_a_placeholder_shows_its_user_id_and_is_found_by_it(db: Engine) -> None:
    """Scenario 2: a user first seen in a public room is found at once by user id."""
    everyone_public(db, {ALICE: None})
    assert search(db, EVE, ALICE) == SearchResult(
        results=[SearchHit(user_id=ALICE, display_name=ALICE, avatar_url=None)], limited=False
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
    assert search(db, EVE, "user", 0) == SearchResult(results=[], limited=False)
    assert search(db, EVE, "user", -1) == SearchResult(results=[], limited=False)


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
        place = rnd.random()
        if place < 0.5:
            world.room("!pub:x", user_id)
        elif place < 0.6:
            world.room("!searcher:x", user_id)
        else:
            world.room(f"!priv{i % 50}:x", user_id)
    return world


ORDER_INDEXES = ("ix_user_directory_name_order", "ix_user_directory_localpart_order")


@contextmanager
def analysed(engine: Engine, world: World, *, indexes: bool = True) -> Iterator[Connection]:
    """The world in a transaction that is rolled back, with fresh planner statistics;
    without the search order indexes of migration 0003 if `indexes` is false (the
    result must not depend on the plan)."""
    with engine.connect() as conn, conn.begin() as transaction:
        save_world(conn, world)
        if not indexes:
            for index in ORDER_INDEXES:
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
    conn: Connection, searcher: str, term: str, limit: int, all_users: bool
) -> SearchResult:
    statement = reference_statement(
        conn.dialect.name, searcher, term, limit, search_all_users=all_users
    )
    if statement is None:
        return SearchResult(results=[], limited=False)
    rows = conn.execute(statement).all()
    return SearchResult(
        results=[
            SearchHit(r.user_id, r.display_name or r.user_id, r.avatar_url) for r in rows[:limit]
        ],
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
    return terms


@pytest.mark.parametrize("indexes", [False, True], ids=["without-order-indexes", "migrated"])
def test_the_postgresql_plan_returns_what_the_reference_query_defines(
    pg: Engine, indexes: bool
) -> None:
    world = generated_world(1500, seed=3)
    # Small limits make the tier branches overflow into one another.
    with analysed(pg, world, indexes=indexes) as conn:
        for term in sample_terms(world, 20):
            for all_users in (False, True):
                for limit in (1, 4):
                    expected = reference_result(conn, BOB, term, limit, all_users)
                    got = search_directory(conn, BOB, term, limit, search_all_users=all_users)
                    assert got == expected, (term, all_users, limit)
