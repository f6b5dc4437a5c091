"""Directory search: who may find whom, and how a term matches and ranks entries.

Visibility (docs/design.md §8, the protocol facts): a searcher sees an entry when every
entry is searchable (search_all_users), when its user is joined to a public room we can
see, or when both are joined to one room we can see. Entries only ever hold a fetched
public profile or a placeholder, so a per-room name can never be found nor shown
(docs/design.md, scenario 1). Only listed entries are ever returned
(user_directory.listed, directory/listing.py).

Options, with Synapse's meaning (its user_directory section):
  search_all_users      every listed entry is visible, except the searcher's own
                        (Synapse's "user_id != searcher"); without it a searcher in a
                        public room finds themself, as in Synapse, but never through a
                        private room (Synapse records no user as sharing one with
                        themself)
  exclude_remote_users  only users of our server_name are returned
  prefer_local_users    within a tier, users of our server_name come first (Synapse
                        doubles their rank)

Matching: the term's first MAX_SEARCH_WORDS words (text.words: NFKC, casefolded,
punctuation splits; the rest are ignored, as Synapse does on PostgreSQL) must each be
a prefix of a word of the user id or of the public display name. Besides, a term whose
normalised form holds INFIX_MIN_CHARS letters or digits in a row also finds the display
names and localparts that merely contain it ("lex" finds "Alex"; Synapse matches word
prefixes only, synapse#13807); such entries rank after every prefix match.

Ranking, best first:
  0. the localpart or the whole user id equals the term ("alice", "@alice:hs.test")
  1. the display name equals the term
  2. the localpart or the user id starts with the term
  3. the display name starts with the term
  4. any other prefix match (the term's words start words of the id or name)
  5. the display name or the localpart contains the term (infix only)
Identifiers come before names at each level, so a stranger naming themself
"@alice:hs.test" never outranks the real @alice. Within a tier, local users come first
with prefer_local_users; then entries with a profile (name or avatar); then tiers 0 and
2 order by localpart, the others by display name (its first NAME_ORDER_CHARS
characters; nameless entries last) and then localpart; the user id breaks ties.
Strings compare by code point on every backend.

On PostgreSQL, ranking every match would cost as much as the match count, which for a
short prefix is a large share of the directory. So each tier is read from an index
that already holds that tier's order and is cut at limit + 1 rows (the indexes of
migration 0003); only when tiers 0-3 leave room is tier 4 asked for, from the GIN
full-text index or by walking the order, whichever the planner expects cheaper, and
only when tiers 0-4 leave room is tier 5, from the trigram indexes of migration 0008
or by walking the order. With prefer_local_users every branch is split in two, local
and remote, so that each still reads its own order. SQLite runs the plain single
query (reference_statement), which defines the result; the PostgreSQL plan agrees
with it row for row, infix included.

The full-text index is only a prefilter: every word is also checked with LIKE on the
stored words, exactly as SQLite checks it, and only the words PostgreSQL's text search
parser represents unchanged are looked up in the index (U+0BF0 TAMIL NUMBER TEN is a
word to Python but the parser drops it, which would silently widen the query); when no
word qualifies, the words are matched by LIKE alone. PostgreSQL's answer per word is
cached per process.

Every PostgreSQL search runs under `statement_timeout` (SEARCH_STATEMENT_TIMEOUT_MS,
set for the search's own transaction); a search that runs out fails with
QueryCanceled, which the API answers with 503. SQLite has no statement timeout.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    case,
    collate,
    false,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    true,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import aliased
from sqlalchemy.types import Text

from directory.models import room_members, rooms, user_directory
from directory.text import MAX_SEARCH_TERM_LENGTH, normalise, split_user_id, words

# Display names order by this many leading characters: enough to order any real name,
# and short enough that an index entry stays far below the btree row size limit even
# for a hostile name that NFKC expands many times over.
NAME_ORDER_CHARS = 128
# Like Synapse (_parse_query_postgres): only the term's first 10 words count, so a
# pasted paragraph costs no more than a name.
MAX_SEARCH_WORDS = 10
# Infix matching needs a trigram to look up: shorter terms match by prefix only.
INFIX_MIN_CHARS = 3
_INFIX_WORD = re.compile(r"[^\W_]+")
# On PostgreSQL, tier 5 ranks at most this many of the entries the trigram indexes find
# (per scope), in whatever order they come: a common infix ("son", "and") is inside a
# share of a large directory, and sorting all of them would cost as much as that share.
# Every entry shown still contains the term and still ranks after every prefix match;
# below this many matches (always, in a small directory) the tier is exact.
INFIX_CANDIDATES = 200


@dataclass(frozen=True)
class SearchHit:
    user_id: str
    # The public display name; None for a placeholder entry (no public name known).
    display_name: str | None
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
    # What a display name or a localpart may contain (tier 5): the keys above that
    # hold INFIX_MIN_CHARS letters or digits in a row (_has_trigram).
    infix_name_keys: list[str]
    infix_localpart_key: str | None

    @property
    def infix(self) -> bool:
        return bool(self.infix_name_keys) or self.infix_localpart_key is not None


def _without_controls(term: str) -> str:
    # NUL cannot be bound on PostgreSQL and lone surrogates cannot be encoded; neither
    # can occur in a stored name, so they only separate words.
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in term)


def _has_trigram(key: str) -> bool:
    """The key holds INFIX_MIN_CHARS letters or digits in a row: something a trigram
    index can look up (pg_trgm reads only words; "l.ta" would ask for every name with
    an "l" word and a "ta" word). Both backends apply it, so they agree."""
    return any(len(w) >= INFIX_MIN_CHARS for w in _INFIX_WORD.findall(key))


def _parse(term: str, indexable: Iterable[str] | None = None) -> _Term | None:
    """The term, or None when it has no word. `indexable`: the words PostgreSQL's
    text search represents unchanged (None: all of them)."""
    term = _without_controls(term[:MAX_SEARCH_TERM_LENGTH])
    found = list(dict.fromkeys(words(term)[:MAX_SEARCH_WORDS]))
    if not found or any(len(w.encode()) > _MAX_LEXEME_BYTES for w in found):
        return None
    # "ali alice" asks no more than "alice": drop words another word already implies,
    # sparing the index the widest prefix scans.
    minimal = [w for w in found if not any(o != w and o.startswith(w) for o in found)]
    whole = normalise(term).strip()
    bare = whole.removeprefix("@")
    localpart, colon, _ = bare.partition(":")
    localpart_words = set(words(localpart))
    usable = minimal if indexable is None else [w for w in minimal if w in set(indexable)]
    # An empty list: no word can be looked up, LIKE alone matches.
    index_words = [w for w in usable if w in localpart_words] or usable
    # A one-letter prefix expands to a large share of the index's words; when a longer
    # word narrows as well, the LIKE checks alone take care of the short one.
    index_words = [w for w in index_words if len(w) > 1] or index_words
    # User ids are printable ASCII (spec appendix "Identifier Grammar"), where SQL
    # lower() and casefold agree; no other term can equal or start one.
    by_user_id = bool(colon) and bare.isascii() and not any(ch.isspace() for ch in bare)
    name_keys = list(dict.fromkeys([whole, bare]))
    localpart_key = None if colon or any(ch.isspace() for ch in bare) else bare
    return _Term(
        words=minimal,
        index_words=index_words,
        name_keys=name_keys,
        localpart_key=localpart_key,
        user_id="@" + bare if by_user_id else None,
        user_id_localpart=localpart if by_user_id else None,
        infix_name_keys=[k for k in name_keys if _has_trigram(k)],
        infix_localpart_key=(
            localpart_key if localpart_key is not None and _has_trigram(localpart_key) else None
        ),
    )


def term_words(term: str) -> list[str]:
    """The words a search for `term` requires (after the cap and deduplication)."""
    parsed = _parse(term)
    return [] if parsed is None else parsed.words


@dataclass(frozen=True)
class _Options:
    searcher: str
    search_all_users: bool
    exclude_remote_users: bool
    prefer_local_users: bool
    # Our homeserver's name: what "local" means.
    server_name: str

    @classmethod
    def of(
        cls,
        searcher: str,
        *,
        search_all_users: bool = False,
        exclude_remote_users: bool = False,
        prefer_local_users: bool = False,
        server_name: str | None = None,
    ) -> _Options:
        return cls(
            searcher=searcher,
            search_all_users=search_all_users,
            exclude_remote_users=exclude_remote_users,
            # Nothing to prefer when every result is local.
            prefer_local_users=prefer_local_users and not exclude_remote_users,
            # A searcher is always one of our users (their token was verified by our
            # homeserver), so their server is ours unless told otherwise.
            server_name=server_name or split_user_id(searcher)[1],
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


def _contains(expression: ColumnElement[Any], infix: str) -> ColumnElement[bool]:
    return expression.like("%" + _escape_like(infix) + "%", escape=_LIKE_ESCAPE)


def _tsquery_text(term_words: Iterable[str]) -> str:
    # Each lexeme quoted (quotes and backslashes doubled) so no input can reach
    # to_tsquery's operators; the words hold only letters and digits anyway.
    return " & ".join("'" + w.replace("\\", "\\\\").replace("'", "''") + "':*" for w in term_words)


def _shares_private_room(searcher: str) -> ColumnElement[bool]:
    """The entry's user shares a visible, non-public room with the searcher (and is
    someone else: Synapse never pairs a user with themself).

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
        .where(
            mine.c.user_id == searcher,
            theirs.c.user_id != searcher,
            rooms.c.is_visible,
            ~rooms.c.is_public,
        )
    )


class _Ranking:
    """Match, tier and order expressions for one term on one backend."""

    def __init__(self, dialect: str, term: _Term, options: _Options) -> None:
        d = user_directory.c
        self.term = term
        self.options = options
        self.postgresql = dialect == "postgresql"
        padded = literal(" ") + d.search_words
        indexed: list[ColumnElement[bool]] = []
        if self.postgresql and term.index_words:
            # Exactly the expression of ix_user_directory_search_words: a prefilter,
            # the LIKE conditions below decide.
            indexed.append(
                func.to_tsvector(_SIMPLE, d.search_words).bool_op("@@")(
                    func.to_tsquery(_SIMPLE, _tsquery_text(term.index_words))
                )
            )
        # Every word, on every backend: a word starts after the start of search_words
        # or after a space. The LIKEs come first: where this is evaluated row by row
        # (the shared-private-room branch), a cheap miss spares to_tsvector.
        checks = []
        for w in term.words:
            check = padded.like(f"% {_escape_like(w)}%", escape=_LIKE_ESCAPE)
            if self.postgresql and w in term.index_words:
                # A recheck of what the index found, true for nearly every row: as a
                # bare LIKE '%...%' the planner would take it for a 1-in-200 filter,
                # expect a handful of matches and sort them all, where walking the
                # name order until limit + 1 match is far cheaper for a popular word.
                # Inside a CASE it is an opaque condition (estimated at one half).
                check = case((check, true()), else_=false())
            checks.append(check)
        self.prefix_match = and_(*checks, *indexed)
        self.no_profile = and_(d.display_name.is_(None), d.avatar_url.is_(None))
        if options.prefer_local_users:
            self.remote: ColumnElement[bool] = d.server_name != options.server_name
        else:
            self.remote = false()
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
        # Tiers 0-4 of an entry that matches by prefix.
        self.prefix_tier = case(
            (or_(false(), *localpart_exact), 0),
            (d.name_key.in_(term.name_keys), 1),
            (or_(false(), *localpart_prefix), 2),
            (or_(*(self._name_starts_with(key) for key in term.name_keys)), 3),
            else_=4,
        )
        infix = [_contains(d.name_key, key) for key in term.infix_name_keys]
        if term.infix_localpart_key is not None:
            infix.append(_contains(d.localpart_key, term.infix_localpart_key))
        if infix:
            self.infix_match: ColumnElement[bool] | None = or_(*infix)
            self.match = or_(self.prefix_match, self.infix_match)
            self.tier = case((self.prefix_match, self.prefix_tier), else_=5)
        else:
            self.infix_match = None
            self.match = self.prefix_match
            self.tier = self.prefix_tier

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

    def filters(self) -> list[ColumnElement[bool]]:
        """What every statement and every branch requires of an entry."""
        d = user_directory.c
        o = self.options
        conditions = [d.listed.is_(true())]
        if o.search_all_users:
            conditions.append(d.user_id != o.searcher)
        if o.exclude_remote_users:
            conditions.append(d.server_name == o.server_name)
        return conditions

    def localities(self) -> list[list[ColumnElement[bool]]]:
        """The branches' split by locality: local then remote with prefer_local_users,
        so each reads its own order; otherwise one, unconditioned."""
        if not self.options.prefer_local_users:
            return [[]]
        server_name = user_directory.c.server_name
        return [
            [server_name == self.options.server_name],
            [server_name != self.options.server_name],
        ]

    def columns(self, tier: ColumnElement[Any]) -> list[ColumnElement[Any]]:
        d = user_directory.c
        return [
            d.user_id,
            d.display_name,
            d.avatar_url,
            tier.label("tier"),
            self.remote.label("remote"),
            self.no_profile.label("no_profile"),
            self.name_order.label("name_order"),
            d.localpart_key,
        ]

    def full_order(self, tier: ColumnElement[Any]) -> list[ColumnElement[Any]]:
        # Tiers 0 and 2 are about the localpart: their name column sorts as absent.
        name = case((tier.in_([0, 2]), null()), else_=self.name_order)
        locality = [self.remote] if self.options.prefer_local_users else []
        return [
            tier,
            *locality,
            self.no_profile,
            name.nulls_last(),
            self.localpart_order,
            self.user_order,
        ]

    def name_tier_order(self) -> list[ColumnElement[Any]]:
        """The order within tiers 4 and 5, locality aside."""
        return [
            self.no_profile,
            self.name_order.nulls_last(),
            self.localpart_order,
            self.user_order,
        ]

    def ranked_scan(self, *conditions: ColumnElement[bool], limit: int) -> Select:
        return (
            select(*self.columns(self.tier))
            .where(self.match, *self.filters(), *conditions)
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
    private room); `rest` finds tier 4 and runs only when `leading` found at most
    `limit` entries of tiers 0-3; `infix` (None for a term too short for infix
    matching) finds tier 5 and runs only when at most `limit` entries of tiers 0-4 were
    found. Branches may overlap: an entry keeps its best tier.
    """

    leading: Select
    rest: Select
    infix: Select | None


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
    found whole by their own branches, so they cannot crowd out a needed entry. Each
    tier's condition implies the prefix match, so no branch needs to check it.
    """
    d = user_directory.c
    term = r.term
    branches = []
    filters = r.filters()

    def branch(*conditions: ColumnElement[bool], order: Sequence[ColumnElement[Any]]) -> Select:
        return (
            select(*r.columns(r.prefix_tier))
            .where(scope, *filters, *conditions)
            .order_by(*order)
            .limit(limit + 1)
        )

    for locality in r.localities():
        for no_profile in (false(), true()):
            group = [r.no_profile.is_(no_profile), *locality]
            if term.localpart_key is not None:
                # Tiers 0 and 2: the localpart equals, then starts with, the term.
                branches.append(
                    branch(
                        *group,
                        _starts_with(r.localpart_order, term.localpart_key),
                        order=(r.localpart_order, r.user_order),
                    )
                )
            if term.user_id is not None:
                # The same for a user id: one localpart, ordered by user id.
                branches.append(
                    branch(
                        *group,
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
                    *locality,
                    r._name_starts_with(key),
                    order=(r.name_order, r.localpart_order, r.user_order),
                )
            )
    return branches


def _tail_branches(
    r: _Ranking,
    scopes: list[ColumnElement[bool]],
    tier: ColumnElement[Any],
    match: ColumnElement[bool],
    limit: int,
    candidates: int | None = None,
) -> Select:
    # Per scope and locality, in tier 4/5 order: the planner either walks
    # ix_user_directory_name_order until limit + 1 entries match (a popular word) or
    # sorts the few index matches (a rare one). Entries of better tiers are not
    # excluded: the exclusion would only mislead its row estimate.
    # `candidates`: rank only the first that many matches the index yields.
    d = user_directory.c
    branches = []
    for scope in scopes:
        for locality in r.localities():
            conditions = [scope, *r.filters(), *locality, match]
            if candidates is not None:
                found = select(d.user_id).where(*conditions).limit(candidates)
                conditions = [d.user_id.in_(found)]
            branches.append(
                select(*r.columns(tier))
                .where(*conditions)
                .order_by(*r.name_tier_order())
                .limit(limit + 1)
            )
    return _union(branches)


def _plan(parsed: _Term, options: _Options, limit: int) -> SearchQueries:
    r = _Ranking("postgresql", parsed, options)
    scopes = _scopes(options.search_all_users)
    leading = [b for scope in scopes for b in _leading_branches(r, scope, limit)]
    if not options.search_all_users:
        # Users seen only through a shared private room: a small set, ranked whole.
        d = user_directory.c
        leading.append(
            r.ranked_scan(~d.in_public_room, _shares_private_room(options.searcher), limit=limit)
        )
    rest = _tail_branches(r, scopes, r.prefix_tier, r.prefix_match, limit)
    infix = None
    if r.infix_match is not None:
        # Only entries without a prefix match are tier 5, but the exclusion stays out
        # of the WHERE clause for the same reason as above; their tier says it.
        infix = _tail_branches(r, scopes, r.tier, r.infix_match, limit, candidates=INFIX_CANDIDATES)
    return SearchQueries(leading=_union(leading), rest=rest, infix=infix)


def search_queries(
    searcher: str,
    term: str,
    limit: int,
    *,
    search_all_users: bool = False,
    exclude_remote_users: bool = False,
    prefer_local_users: bool = False,
    server_name: str | None = None,
    indexable: Iterable[str] | None = None,
) -> SearchQueries | None:
    """The PostgreSQL statements for this search (None when the term has no word).
    `indexable`: the words the text search represents (None: every word)."""
    parsed = _parse(term, indexable)
    if parsed is None:
        return None
    options = _Options.of(
        searcher,
        search_all_users=search_all_users,
        exclude_remote_users=exclude_remote_users,
        prefer_local_users=prefer_local_users,
        server_name=server_name,
    )
    return _plan(parsed, options, max(limit, 0))


def _union(branches: list[Select]) -> Select:
    if len(branches) == 1:
        return branches[0]
    return select(union_all(*branches).subquery("branches"))


def reference_statement(
    dialect: str,
    searcher: str,
    term: str,
    limit: int,
    *,
    search_all_users: bool = False,
    exclude_remote_users: bool = False,
    prefer_local_users: bool = False,
    server_name: str | None = None,
    indexable: Iterable[str] | None = None,
) -> Select | None:
    """The whole search as one ranked query: what SQLite runs, and the definition the
    PostgreSQL plan must agree with row for row."""
    parsed = _parse(term, indexable)
    if parsed is None:
        return None
    options = _Options.of(
        searcher,
        search_all_users=search_all_users,
        exclude_remote_users=exclude_remote_users,
        prefer_local_users=prefer_local_users,
        server_name=server_name,
    )
    return _Ranking(dialect, parsed, options).ranked_scan(
        _visible(searcher, search_all_users), limit=max(limit, 0)
    )


# --- running it -----------------------------------------------------------------------


def _sort_key(row: Any) -> tuple:
    # The order of _Ranking.full_order, in Python (str compares by code point). The
    # remote column is constant false unless prefer_local_users.
    name = None if row.tier in (0, 2) else row.name_order
    return (
        row.tier,
        bool(row.remote),
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


def _prepare_search_transaction(conn: Connection, statement_timeout_ms: int) -> None:
    # psycopg prepares a statement text it has run five times, and PostgreSQL may then
    # settle on a generic plan, blind to the term: no LIKE range, a guessed match
    # count, so one term's plan would serve another's. Nor does a lookup this size
    # gain from JIT compilation, which a high estimate can trigger (~100 ms), nor from
    # parallel workers, whose start costs more than a bounded walk of an index takes.
    # And no search may hold a connection for long. The settings end with the
    # caller's transaction.
    settings = [
        func.set_config("plan_cache_mode", "force_custom_plan", true()),
        func.set_config("jit", "off", true()),
        func.set_config("max_parallel_workers_per_gather", "0", true()),
    ]
    if statement_timeout_ms > 0:
        settings.append(func.set_config("statement_timeout", str(statement_timeout_ms), true()))
    conn.execute(select(*settings))


# Per process: word -> whether PostgreSQL's 'simple' text search turns it into exactly
# one lexeme, itself. Bounded: cleared when full (terms are user input).
_INDEXABLE_CACHE_SIZE = 100_000
_indexable_cache: dict[str, bool] = {}
_indexable_lock = threading.Lock()
_INDEXABLE_QUERY = text(
    "SELECT w, tsvector_to_array(to_tsvector('simple', w)) = ARRAY[w] AS same "
    "FROM unnest(:words) AS w"
).bindparams(bindparam("words", type_=ARRAY(Text)))


def indexable_words(conn: Connection, candidates: Iterable[str]) -> set[str]:
    """The words PostgreSQL's text search represents unchanged (asked once per word and
    process): only those may be looked up in the full-text index."""
    candidates = list(dict.fromkeys(candidates))
    unknown = [w for w in candidates if w not in _indexable_cache]
    if unknown:
        answers = {
            row.w: bool(row.same) for row in conn.execute(_INDEXABLE_QUERY, {"words": unknown})
        }
        with _indexable_lock:
            if len(_indexable_cache) + len(answers) > _INDEXABLE_CACHE_SIZE:
                _indexable_cache.clear()
            _indexable_cache.update(answers)
        return {w for w in candidates if _indexable_cache.get(w, answers.get(w, False))}
    return {w for w in candidates if _indexable_cache[w]}


def search_directory(
    conn: Connection,
    searcher: str,
    term: str,
    limit: int,
    *,
    search_all_users: bool = False,
    exclude_remote_users: bool = False,
    prefer_local_users: bool = False,
    server_name: str | None = None,
    statement_timeout_ms: int = 0,
) -> SearchResult:
    """Search as `searcher`. `limit` 0 (or less) returns no result but still says
    whether there is one (`limited`). `server_name` is ours (default: the searcher's).
    `statement_timeout_ms` bounds each statement on PostgreSQL (0: no bound)."""
    limit = max(limit, 0)
    options = dict(
        search_all_users=search_all_users,
        exclude_remote_users=exclude_remote_users,
        prefer_local_users=prefer_local_users,
        server_name=server_name,
    )
    if conn.dialect.name == "postgresql":
        candidates = term_words(term)
        if not candidates:
            return EMPTY
        _prepare_search_transaction(conn, statement_timeout_ms)
        queries = search_queries(
            searcher, term, limit, indexable=indexable_words(conn, candidates), **options
        )
        assert queries is not None
        found = _best_per_user(conn.execute(queries.leading))
        # Tier-4 entries from the private-room branch do not show that tier 4 of the
        # public scope can be skipped.
        if sum(row.tier < 4 for row in found.values()) <= limit:
            for user_id, row in _best_per_user(conn.execute(queries.rest)).items():
                found.setdefault(user_id, row)
            if queries.infix is not None and sum(row.tier < 5 for row in found.values()) <= limit:
                for user_id, row in _best_per_user(conn.execute(queries.infix)).items():
                    found.setdefault(user_id, row)
        rows = sorted(found.values(), key=_sort_key)[: limit + 1]
    else:
        statement = reference_statement(conn.dialect.name, searcher, term, limit, **options)
        if statement is None:
            return EMPTY
        rows = conn.execute(statement).all()
    hits = [
        SearchHit(user_id=row.user_id, display_name=row.display_name, avatar_url=row.avatar_url)
        for row in rows[:limit]
    ]
    return SearchResult(results=hits, limited=len(rows) > limit)
