"""Directory search: who may find whom, and how a term matches and ranks entries.

Visibility (docs/design.md §8, the protocol facts): a searcher sees an entry when every
entry is searchable (search_all_users), when its user is joined to a public room we can
see, or when both are joined to one room we can see. Entries only ever hold a fetched
public profile or a placeholder, so a per-room name can never be found nor shown
(docs/design.md, scenario 1).

Matching: every word of the term (text.words: NFKC, casefolded, punctuation splits)
must be a prefix of a word of the user id or of the public display name.

Ranking, best first:
  0. the localpart or the whole user id equals the term ("alice", "@alice:hs.test")
  1. the display name equals the term
  2. the localpart or the user id starts with the term
  3. the display name starts with the term
  4. any other match (the term's words are found inside the id or name)
Identifiers come before names at each level, so a stranger naming themself
"@alice:hs.test" never outranks the real @alice. Within a tier, entries with a profile
(name or avatar) come first; then tiers 0 and 2 order by localpart, the others by
display name (its first NAME_ORDER_CHARS characters; nameless entries last) and then
localpart; the user id breaks ties. Strings compare by code point on every backend.

On PostgreSQL, ranking every match would cost as much as the match count, which for a
short prefix is a large share of the directory. So each tier is read from an index
that already holds that tier's order and is cut at limit + 1 rows (the indexes of
migration 0003); only when tiers 0-3 leave room is tier 4 asked for,
from the GIN index or by walking the order, whichever the planner expects cheaper.
SQLite runs the plain single query (reference_statement), which defines the result.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    case,
    collate,
    false,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.orm import aliased

from directory.models import room_members, rooms, user_directory
from directory.text import MAX_SEARCH_TERM_LENGTH, normalise, words

# Display names order by this many leading characters: enough to order any real name,
# and short enough that an index entry stays far below the btree row size limit even
# for a hostile name that NFKC expands many times over.
NAME_ORDER_CHARS = 128


@dataclass(frozen=True)
class SearchHit:
    user_id: str
    # The public display name, or the user id for a placeholder entry.
    display_name: str
    avatar_url: str | None


@dataclass(frozen=True)
class SearchResult:
    results: list[SearchHit]
    limited: bool


EMPTY = SearchResult(results=[], limited=False)

# PostgreSQL drops (with a NOTICE) lexemes longer than this from tsvectors and
# tsqueries alike: such a word cannot be in the index, and must not silently vanish
# from the query either (that would widen it).
_MAX_LEXEME_BYTES = 2046

_LIKE_ESCAPE = "\\"
_NAME_ORDER_CHARS_SQL = literal_column(str(NAME_ORDER_CHARS))
# Rendered inline, never bound: the planner matches index expressions as written.
_SIMPLE = literal_column("'simple'")


# --- the term -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Term:
    words: list[str]  # no word is a prefix of another
    # The words the GIN index looks up; the others are checked on the rows it finds.
    # A server name ("matrix", "org") is a word of every one of its users, so looking
    # it up costs as much as the server is big, and narrows nothing the localpart
    # has not narrowed already.
    index_words: list[str]
    # The whole normalised term and, if different, the same without a leading '@':
    # what a display name may equal or start with.
    name_keys: list[str]
    # What a localpart may equal or start with; None when the term cannot be the
    # start of a localpart (it holds a ':' or whitespace).
    localpart_key: str | None
    # For a term with a server part ("@alice:remote.te"): the lowered user id it may
    # equal or start with, and the localpart such a user id has.
    user_id: str | None
    user_id_localpart: str | None


def _without_controls(term: str) -> str:
    # NUL cannot be bound on PostgreSQL and lone surrogates cannot be encoded; neither
    # can occur in a stored name, so they only separate words.
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in term)


def _parse(term: str) -> _Term | None:
    term = _without_controls(term[:MAX_SEARCH_TERM_LENGTH])
    found = list(dict.fromkeys(words(term)))
    if not found or any(len(w.encode()) > _MAX_LEXEME_BYTES for w in found):
        return None
    # "ali alice" asks no more than "alice": drop words another word already implies,
    # sparing the index the widest prefix scans.
    minimal = [w for w in found if not any(o != w and o.startswith(w) for o in found)]
    whole = normalise(term).strip()
    bare = whole.removeprefix("@")
    localpart, colon, _ = bare.partition(":")
    localpart_words = set(words(localpart))
    index_words = [w for w in minimal if w in localpart_words] or minimal
    # User ids are printable ASCII (spec appendix "Identifier Grammar"), where SQL
    # lower() and casefold agree; no other term can equal or start one.
    by_user_id = bool(colon) and bare.isascii() and not any(ch.isspace() for ch in bare)
    return _Term(
        words=minimal,
        index_words=index_words,
        name_keys=list(dict.fromkeys([whole, bare])),
        localpart_key=None if colon or any(ch.isspace() for ch in bare) else bare,
        user_id="@" + bare if by_user_id else None,
        user_id_localpart=localpart if by_user_id else None,
    )


# --- SQL building blocks --------------------------------------------------------------


def _escape_like(value: str) -> str:
    return (
        value.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2)
        .replace("%", _LIKE_ESCAPE + "%")
        .replace("_", _LIKE_ESCAPE + "_")
    )


def _starts_with(expression: ColumnElement[Any], prefix: str) -> ColumnElement[bool]:
    return expression.like(_escape_like(prefix) + "%", escape=_LIKE_ESCAPE)


def _tsquery_text(term_words: Iterable[str]) -> str:
    # Each lexeme quoted (quotes and backslashes doubled) so no input can reach
    # to_tsquery's operators; the words hold only letters and digits anyway.
    return " & ".join("'" + w.replace("\\", "\\\\").replace("'", "''") + "':*" for w in term_words)


def _shares_private_room(searcher: str) -> ColumnElement[bool]:
    """The entry's user shares a visible, non-public room with the searcher.

    Members of a visible public room have in_public_room set already, so private rooms
    are all that need looking at; the set is the searcher's own neighbourhood, whose
    size does not grow with the directory.
    """
    mine = aliased(room_members, name="mine")
    theirs = aliased(room_members, name="theirs")
    return user_directory.c.user_id.in_(
        select(theirs.c.user_id)
        .select_from(mine)
        .join(rooms, rooms.c.room_id == mine.c.room_id)
        .join(theirs, theirs.c.room_id == mine.c.room_id)
        .where(mine.c.user_id == searcher, rooms.c.is_visible, ~rooms.c.is_public)
    )


class _Ranking:
    """Match, tier and order expressions for one term on one backend."""

    def __init__(self, dialect: str, term: _Term) -> None:
        d = user_directory.c
        self.term = term
        self.postgresql = dialect == "postgresql"
        padded = literal(" ") + d.search_words
        scanned = term.words
        indexed: list[ColumnElement[bool]] = []
        if self.postgresql:
            # Exactly the expression of ix_user_directory_search_words.
            indexed.append(
                func.to_tsvector(_SIMPLE, d.search_words).bool_op("@@")(
                    func.to_tsquery(_SIMPLE, _tsquery_text(term.index_words))
                )
            )
            scanned = [w for w in term.words if w not in term.index_words]
        # A word starts after the start of search_words or after a space.
        self.match = and_(
            *indexed,
            *(padded.like(f"% {_escape_like(w)}%", escape=_LIKE_ESCAPE) for w in scanned),
        )
        self.no_profile = and_(d.display_name.is_(None), d.avatar_url.is_(None))
        if self.postgresql:
            # Spelled as in the recommended index, the length inline rather than bound,
            # so that even a generic plan matches the index expression.
            self.name_order = collate(func.left(d.name_key, _NAME_ORDER_CHARS_SQL), "C")
        else:
            self.name_order = func.substr(d.name_key, 1, NAME_ORDER_CHARS)
        self.localpart_order = self._code_order(d.localpart_key)
        self.user_order = self._code_order(d.user_id)

        localpart_exact: list[ColumnElement[bool]] = []
        localpart_prefix: list[ColumnElement[bool]] = []
        if term.localpart_key is not None:
            localpart_exact.append(d.localpart_key == term.localpart_key)
            localpart_prefix.append(_starts_with(self.localpart_order, term.localpart_key))
        if term.user_id is not None:
            lowered = func.lower(d.user_id)
            same_localpart = d.localpart_key == term.user_id_localpart
            localpart_exact.append(and_(same_localpart, lowered == term.user_id))
            localpart_prefix.append(and_(same_localpart, _starts_with(lowered, term.user_id)))
        self.tier = case(
            (or_(false(), *localpart_exact), 0),
            (d.name_key.in_(term.name_keys), 1),
            (or_(false(), *localpart_prefix), 2),
            (or_(*(self._name_starts_with(key) for key in term.name_keys)), 3),
            else_=4,
        )

    def _code_order(self, expression: ColumnElement[Any]) -> ColumnElement[Any]:
        # Code point order on both backends (SQLite's default BINARY already is), and
        # the collation under which a btree serves LIKE 'prefix%' as a range.
        return collate(expression, "C") if self.postgresql else expression

    def _name_starts_with(self, key: str) -> ColumnElement[bool]:
        # The range on the indexed, truncated name; the full name decides beyond it.
        condition = _starts_with(self.name_order, key[:NAME_ORDER_CHARS])
        if len(key) > NAME_ORDER_CHARS:
            condition = and_(condition, _starts_with(user_directory.c.name_key, key))
        return condition

    def columns(self) -> list[ColumnElement[Any]]:
        d = user_directory.c
        return [
            d.user_id,
            d.display_name,
            d.avatar_url,
            self.tier.label("tier"),
            self.no_profile.label("no_profile"),
            self.name_order.label("name_order"),
            d.localpart_key,
        ]

    def full_order(self, tier: ColumnElement[Any]) -> list[ColumnElement[Any]]:
        # Tiers 0 and 2 are about the localpart: their name column sorts as absent.
        name = case((tier.in_([0, 2]), null()), else_=self.name_order)
        return [
            tier,
            self.no_profile,
            name.nulls_last(),
            self.localpart_order,
            self.user_order,
        ]

    def ranked_scan(self, *conditions: ColumnElement[bool], limit: int) -> Select:
        return (
            select(*self.columns())
            .where(self.match, *conditions)
            .order_by(*self.full_order(self.tier))
            .limit(limit + 1)
        )


def _visible(searcher: str, search_all_users: bool) -> ColumnElement[bool]:
    if search_all_users:
        return true()
    return or_(user_directory.c.in_public_room, _shares_private_room(searcher))


# --- the PostgreSQL plan --------------------------------------------------------------


@dataclass(frozen=True)
class SearchQueries:
    """What search_directory runs on PostgreSQL, in order.

    `leading` finds tiers 0-3 (and every tier among users seen only through a shared
    private room); `rest` finds tier 4 and runs only when `leading` found fewer than
    limit + 1 entries. Branches may overlap: an entry keeps its best tier.
    """

    leading: Select
    rest: Select


def _scopes(search_all_users: bool) -> list[ColumnElement[bool]]:
    in_public_room = user_directory.c.in_public_room
    if search_all_users:
        return [in_public_room.is_(true()), in_public_room.is_(false())]
    return [in_public_room.is_(true())]


def _leading_branches(r: _Ranking, scope: ColumnElement[bool], limit: int) -> list[Select]:
    """Tiers 0-3 of one scope: ranges of the recommended indexes, read in tier order.

    A branch lists the entries satisfying its own tier's condition in that tier's
    order, so its first limit + 1 rows hold the best of its tier except for entries
    of better tiers; and whenever those better tiers do not fill the result, they are
    found whole by their own branches, so they cannot crowd out a needed entry.
    """
    d = user_directory.c
    term = r.term
    branches = []

    def branch(*conditions: ColumnElement[bool], order: Sequence[ColumnElement[Any]]) -> Select:
        return select(*r.columns()).where(scope, *conditions).order_by(*order).limit(limit + 1)

    for no_profile in (false(), true()):
        group = r.no_profile.is_(no_profile)
        if term.localpart_key is not None:
            # Tiers 0 and 2: the localpart equals, then starts with, the term.
            branches.append(
                branch(
                    group,
                    _starts_with(r.localpart_order, term.localpart_key),
                    order=(r.localpart_order, r.user_order),
                )
            )
        if term.user_id is not None:
            # The same for a user id: one localpart, ordered by user id.
            branches.append(
                branch(
                    group,
                    # Compared in the index's collation, so the index finds it.
                    r.localpart_order == term.user_id_localpart,
                    _starts_with(func.lower(d.user_id), term.user_id),
                    order=(r.localpart_order, r.user_order),
                )
            )
    # Tiers 1 and 3: the display name equals, then starts with, the term. Entries
    # without a profile have no name, so only the profile group can hold these.
    for key in term.name_keys:
        branches.append(
            branch(
                r.no_profile.is_(false()),
                r._name_starts_with(key),
                order=(r.name_order, r.localpart_order, r.user_order),
            )
        )
    return branches


def search_queries(
    searcher: str, term: str, limit: int, *, search_all_users: bool = False
) -> SearchQueries | None:
    """The PostgreSQL statements for this search (None when none would run)."""
    parsed = _parse(term)
    if parsed is None or limit <= 0:
        return None
    r = _Ranking("postgresql", parsed)
    scopes = _scopes(search_all_users)
    leading = [b for scope in scopes for b in _leading_branches(r, scope, limit)]
    if not search_all_users:
        # Users seen only through a shared private room: a small set, ranked whole.
        d = user_directory.c
        leading.append(
            r.ranked_scan(~d.in_public_room, _shares_private_room(searcher), limit=limit)
        )
    # Tier 4 per scope, in full order: the planner either walks
    # ix_user_directory_name_order until limit + 1 entries match (a popular word) or
    # sorts the few GIN matches (a rare one). Entries of tiers 0-3 are not excluded:
    # the exclusion would only mislead its row estimate.
    rest = [
        select(*r.columns())
        .where(scope, r.match)
        .order_by(r.no_profile, r.name_order.nulls_last(), r.localpart_order, r.user_order)
        .limit(limit + 1)
        for scope in scopes
    ]
    return SearchQueries(leading=_union(leading), rest=_union(rest))


def _union(branches: list[Select]) -> Select:
    if len(branches) == 1:
        return branches[0]
    return select(union_all(*branches).subquery("branches"))


def reference_statement(
    dialect: str, searcher: str, term: str, limit: int, *, search_all_users: bool = False
) -> Select | None:
    """The whole search as one ranked query: what SQLite runs, and the definition the
    PostgreSQL plan must agree with row for row."""
    parsed = _parse(term)
    if parsed is None or limit <= 0:
        return None
    return _Ranking(dialect, parsed).ranked_scan(_visible(searcher, search_all_users), limit=limit)


# --- running it -----------------------------------------------------------------------


def _sort_key(row: Any) -> tuple:
    # The order of _Ranking.full_order, in Python (str compares by code point).
    name = None if row.tier in (0, 2) else row.name_order
    return (
        row.tier,
        bool(row.no_profile),
        name is None,
        name or "",
        row.localpart_key,
        row.user_id,
    )


def _best_per_user(rows: Iterable[Any]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for row in rows:
        if row.user_id not in best or row.tier < best[row.user_id].tier:
            best[row.user_id] = row
    return best


def _plan_each_search_afresh(conn: Connection) -> None:
    # psycopg prepares a statement text it has run five times, and PostgreSQL may then
    # settle on a generic plan, blind to the term: no LIKE range, a guessed match
    # count, so one term's plan would serve another's. Nor does a lookup this size
    # gain from JIT compilation, which a high estimate can trigger (~100 ms). Both
    # settings end with the caller's transaction.
    conn.execute(
        select(
            func.set_config("plan_cache_mode", "force_custom_plan", true()),
            func.set_config("jit", "off", true()),
        )
    )


def search_directory(
    conn: Connection, searcher: str, term: str, limit: int, *, search_all_users: bool = False
) -> SearchResult:
    if conn.dialect.name == "postgresql":
        queries = search_queries(searcher, term, limit, search_all_users=search_all_users)
        if queries is None:
            return EMPTY
        _plan_each_search_afresh(conn)
        found = _best_per_user(conn.execute(queries.leading))
        # Tier-4 entries from the private-room branch do not show that tier 4 of the
        # public scope can be skipped.
        if sum(row.tier < 4 for row in found.values()) <= limit:
            for user_id, row in _best_per_user(conn.execute(queries.rest)).items():
                found.setdefault(user_id, row)
        rows = sorted(found.values(), key=_sort_key)[: limit + 1]
    else:
        statement = reference_statement(
            conn.dialect.name, searcher, term, limit, search_all_users=search_all_users
        )
        if statement is None:
            return EMPTY
        rows = conn.execute(statement).all()
    hits = [
        SearchHit(
            user_id=row.user_id,
            display_name=row.display_name or row.user_id,
            avatar_url=row.avatar_url,
        )
        for row in rows[:limit]
    ]
    return SearchResult(results=hits, limited=len(rows) > limit)
