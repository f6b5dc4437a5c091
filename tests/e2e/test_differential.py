"""Differential test: our search against Synapse's own, on one state (issue 13, point 5).

On the two-Synapse testbed (our appservice on hs1) one state is built: local and remote
users; a public room, a world-readable one and private ones; users who share only a
private room, users who share no room at all, a guest, a deactivated user and our
appservice's sender. Every display name is set globally only (never per room), so
Synapse's directory, which copies names from member events, shows the same names ours
fetches from public profiles, and the two must answer alike.

Every local user of hs1 (only local users can search) then sends the same searches to
hs1's own /_matrix/client/v3/user_directory/search (default config: search_all_users
false) and to ours, with a limit neither reaches. The result SETS of user ids must be
equal, and every user both return must carry the same display name and avatar, except
for the deliberate differences below. Each is named, explained, and computed from what
the test built (the MODEL), never from our answer.

Synapse's directory is updated asynchronously, so its answers are read until two
sweeps in a row agree before they are compared.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import pytest

from tests.e2e.conftest import Deployment
from tests.support.processes import wait_until
from tests.support.synapse import MatrixUser, SynapseServer

pytestmark = pytest.mark.e2e

# Above every result count here and at most Synapse's cap (50): neither side is limited.
LIMIT = 50

# -- the deliberate differences ------------------------------------------------------------


@dataclass(frozen=True)
class Allowance:
    name: str
    why: str


# Each adds to Synapse's answer the users the MODEL computes for it; "must" allowances
# are required, "may" allowances only tolerated.
INFIX = Allowance(
    "infix (must)",
    "A term holding 3 letters or digits in a row also finds the display names and "
    "localparts that "
    'merely contain it, the whole term, spaces and punctuation included ("lex" finds '
    '"Alexander" and "Dan Flexer"), ranked after every prefix match; Synapse '
    "matches word prefixes only (synapse#13807). Both our backends do it alike (SQLite "
    "by scanning, PostgreSQL from trigram indexes: README, directory/search.py), so on "
    "each we must return, beyond Synapse's set, exactly the users the searcher may see "
    "whose normalised name or localpart contains the normalised term.",
)
# The backends where INFIX applies; on any other our answer must equal Synapse's.
INFIX_BACKENDS = frozenset({"postgresql", "sqlite"})
TEN_WORDS = Allowance(
    "at most 10 words (must)",
    "Like Synapse on PostgreSQL we use the term's first 10 words and ignore the rest; "
    "Synapse on SQLite (the testbed's) requires every word. For a longer term we must "
    "also return the users matching its first 10 words.",
)
GUESTS = Allowance(
    "guests listed (may)",
    "Synapse never gives a guest a directory row on its live path (registering a guest "
    "skips handle_local_profile_change, and guests cannot set a profile), though its "
    "full rebuild would list them. We list a guest in a room like anyone else, under "
    "their public profile. So we may return, beyond Synapse's set, guests the searcher "
    "may see who match the term.",
)
PLACEHOLDER_HAS_NO_NAME = Allowance(
    "placeholder without display_name",
    "A user with no public display name is shown by us without a display_name key, by "
    "Synapse with display_name null: both mean 'no name', and compare equal.",
)
ALLOWANCES = (INFIX, TEN_WORDS, GUESTS, PLACEHOLDER_HAS_NO_NAME)
MAX_WORDS = 10
INFIX_MIN_CHARS = 3


# -- the state the test builds, and what it implies ------------------------------------------

_WORD = re.compile(r"[^\W_]+")


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def words(text: str | None) -> list[str]:
    """Alphanumeric runs, normalised: how both sides split names, ids and terms."""
    return _WORD.findall(normalise(text)) if text else []


@dataclass
class Person:
    key: str
    user: MatrixUser
    name: str | None
    avatar: str | None = None
    # Neither directory lists these (deactivated; our appservice's sender).
    unlisted: bool = False
    guest: bool = False

    @property
    def user_id(self) -> str:
        return self.user.user_id

    @property
    def local_on(self) -> str:
        return self.user.server.server_name

    def tokens(self) -> list[str]:
        return words(self.user_id) + words(self.name)


@dataclass
class Model:
    """Who is in which room, as the test made it."""

    hs1: SynapseServer
    people: dict[str, Person] = field(default_factory=dict)
    # room key -> (public or world-readable, member keys)
    rooms: dict[str, tuple[bool, set[str]]] = field(default_factory=dict)

    def add(self, person: Person) -> Person:
        self.people[person.key] = person
        return person

    def listed(self) -> list[Person]:
        return [p for p in self.people.values() if not p.unlisted]

    def visible_to(self, searcher: Person) -> set[str]:
        """Synapse's rule (search_all_users false), which is ours: users in a public or
        world-readable room, and users sharing a private room with the searcher; every
        room here has a member on hs1. The searcher sees itself only through a public
        room (Synapse records no user as sharing a private room with itself)."""
        seen: set[str] = set()
        for public, members in self.rooms.values():
            if public:
                seen |= members
            elif searcher.key in members:
                seen |= members - {searcher.key}
        return {self.people[k].user_id for k in seen if not self.people[k].unlisted}

    def prefix_matches(self, term: str, max_words: int | None = None) -> set[str]:
        """Listed users of whom every term word (the first max_words) starts a word of
        the user id or the display name."""
        term_words = words(term)[:max_words]
        if not term_words:
            return set()
        return {
            p.user_id
            for p in self.listed()
            if all(any(t.startswith(w) for t in p.tokens()) for w in term_words)
        }

    def infix_matches(self, term: str) -> set[str]:
        """Listed users whose normalised display name or localpart contains the whole
        normalised term (or the term without a leading '@'), for a term holding at least
        INFIX_MIN_CHARS letters or digits in a row (what a trigram index can look up);
        a localpart only for a term without ':' or spaces."""
        whole = normalise(term).strip()
        bare = whole.removeprefix("@")
        keys = {
            k
            for k in (whole, bare)
            if any(len(run) >= INFIX_MIN_CHARS for run in re.findall(r"[^\W_]+", k))
        }
        localpart_key = bare if ":" not in bare and not re.search(r"\s", bare) else None
        found = set()
        for p in self.listed():
            name = normalise(p.name) if p.name else ""
            localpart = normalise(p.user_id[1:].split(":", 1)[0])
            if any(k in name for k in keys) or (
                localpart_key in keys and localpart_key in localpart
            ):
                found.add(p.user_id)
        return found

    def guests(self) -> set[str]:
        return {p.user_id for p in self.listed() if p.guest}


# -- talking to both ---------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    errcode: str | None
    # user id -> (display name, avatar url); None for a missing key or null.
    hits: dict[str, tuple[str | None, str | None]]
    limited: bool | None


def _answer(response: httpx.Response) -> Answer:
    body = response.json()
    if response.status_code != 200:
        return Answer(response.status_code, body.get("errcode"), {}, None)
    hits = {
        hit["user_id"]: (hit.get("display_name"), hit.get("avatar_url")) for hit in body["results"]
    }
    assert len(hits) == len(body["results"]), f"a user listed twice: {body}"
    return Answer(200, None, hits, body["limited"])


class Searcher:
    """One HTTP client for both endpoints."""

    def __init__(self, deployment: Deployment) -> None:
        self.ours_url = f"{deployment.url}/_matrix/client/v3/user_directory/search"
        self.synapse_url = f"{deployment.hs1.client_url}/_matrix/client/v3/user_directory/search"
        self.client = httpx.Client(timeout=30)

    def _post(self, url: str, person: Person, term: str) -> Answer:
        return _answer(
            self.client.post(
                url,
                json={"search_term": term, "limit": LIMIT},
                headers={"Authorization": f"Bearer {person.user.access_token}"},
            )
        )

    def synapse(self, person: Person, term: str) -> Answer:
        return self._post(self.synapse_url, person, term)

    def ours(self, person: Person, term: str) -> Answer:
        return self._post(self.ours_url, person, term)

    def sweep(
        self, ask: Callable[[Person, str], Answer], asks: Iterable[tuple[Person, str]]
    ) -> dict[tuple[str, str], Answer]:
        return {(person.key, term): ask(person, term) for person, term in asks}


# -- building the state ------------------------------------------------------------------


def _as_sender_join(hs: SynapseServer, room_id: str) -> str:
    """Our appservice's sender joins a room (the AS token acts as the sender)."""
    assert hs.appservice is not None
    response = hs.http.post(
        f"/_matrix/client/v3/join/{quote(room_id, safe='')}",
        json={},
        headers={"Authorization": f"Bearer {hs.appservice.as_token}"},
    )
    assert response.status_code == 200, response.text
    return f"@{hs.appservice.sender_localpart}:{hs.server_name}"


def build_state(testbed: Deployment) -> Model:
    hs1, hs2 = testbed.hs1, testbed.hs2
    assert hs2 is not None
    model = Model(hs1)

    def person(
        key: str, server: SynapseServer, name: str | None, avatar: str | None = None
    ) -> Person:
        user = server.register(key)
        # Global only: Synapse gives a new user its localpart as name; "" removes it.
        user.set_displayname(name or "")
        if avatar is not None:
            user.set_avatar_url(avatar)
        return model.add(Person(key, user, name, avatar))

    # Local users of hs1 and remote users on hs2. Localparts differ from names, so each
    # can be searched apart. Bob, Privy and Dan first: their room starts a delay.
    bob = person("bob", hs1, "Bob")
    privy = person("privy", hs1, "Privy Lexa")
    dan = person("rdan", hs2, "Dan Flexer")
    # First, so that its delay runs while the rest is built: Synapse lists a remote user
    # seen only in private rooms once it has fetched their profile, a minute after the
    # join (USER_DIRECTORY_STALE_REFRESH_TIME); until then it lists nobody for them.
    shared = bob.user.create_room(public=False, invite=[privy.user_id, dan.user_id])
    privy.user.join(shared)
    dan.user.join(shared, via=hs1.server_name)
    model.rooms["private_bob"] = (False, {"bob", "privy", "rdan"})

    alexander = person("alexander", hs1, "Alexander")
    mary = person("mjw", hs1, "Mary Jane Watson", avatar="mxc://example.org/maryavatar")
    carol = person("carol.obs", hs1, "Carol O'Brien-Smith")
    nameless = person("nameless", hs1, None)
    loner = person("loner", hs1, "Lonely Alexis")
    person("hermit", hs1, "Hermit Crab")  # in no room at all
    quitter = person("quitter", hs1, "Quincy Quitter")
    alice = person("ralice", hs2, "Alice Walker", avatar="mxc://example.org/aliceavatar")
    nona = person("rnona", hs2, None)
    eve = person("reve", hs2, "Eve Faraway")  # shares no room with hs1

    # The public room on hs1, open to guests: local, remote, guest, our sender.
    public = alexander.user.create_room(public=True)
    alexander.user.set_guest_access(public, "can_join")
    for p in (mary, quitter):
        p.user.join(public)
    alice.user.join(public, via=hs1.server_name)
    guest_user = hs1.register_guest()
    guest_user.join(public)
    guest = model.add(Person("guest", guest_user, guest_user.user_id[1:].split(":")[0]))
    guest.guest = True
    sender_id = _as_sender_join(hs1, public)
    model.add(Person("sender", MatrixUser(sender_id, "", hs1), None, unlisted=True))
    model.rooms["public"] = (
        True,
        {"alexander", "mjw", "quitter", "ralice", "guest", "sender"},
    )

    # A world-readable room on hs2 (invite-only, history world_readable).
    readable = nona.user.create_room(public=False, invite=[carol.user_id])
    nona.user.set_history_visibility(readable, "world_readable")
    carol.user.join(readable, via=hs2.server_name)
    model.rooms["world_readable"] = (True, {"rnona", "carol.obs"})

    # Private rooms: mary and nameless; loner alone.
    pair = mary.user.create_room(public=False, invite=[nameless.user_id])
    nameless.user.join(pair)
    model.rooms["private_mary"] = (False, {"mjw", "nameless"})
    loner.user.create_room(public=False)
    model.rooms["private_loner"] = (False, {"loner"})
    # eve's room lives on hs2 only: hs1 never hears of it.
    eve.user.create_room(public=True)

    # A deactivated user: Synapse makes them leave their rooms and drops them.
    quitter.user.deactivate()
    quitter.unlisted = True
    return model


# -- the comparison ----------------------------------------------------------------------


def terms_for(model: Model) -> list[str]:
    hs1_name = model.hs1.server_name
    host1, port1 = hs1_name.split(":")
    alice = model.people["ralice"]
    hs2_name = alice.local_on
    # fmt: off
    return [
        # prefixes, 1-2 letters
        "a", "al", "m", "b", "wa", "j", "q", "ale", "pri", "car", "rd", "non",
        # full names and localparts
        "Alexander", "Mary Jane Watson", "Bob", "Privy Lexa", "Dan Flexer", "Alice Walker",
        "Lonely Alexis", "Hermit Crab", "Eve Faraway", "Quincy Quitter",
        "alexander", "mjw", "bob", "nameless", "loner", "hermit", "quitter", "ralice",
        "rnona", "reve", "userdirectory", model.people["guest"].name or "",
        # user ids, servers
        model.people["mjw"].user_id, alice.user_id, model.people["rnona"].user_id,
        "@bob", f"@rdan:{hs2_name}", hs1_name, host1, port1, hs2_name, "127", "0.0.1",
        # several words, in any order
        "mary watson", "watson mary", "jane mary", "walker alice", "lonely alex",
        "bob localhost", "alexander nobody",
        # punctuation
        "o'brien", "Brien-Smith", "mary.jane", "carol.obs", "@mjw", "Bob!", "(alice)",
        "alice, walker", "#lexa",
        # more than 10 words: the 11th is ignored (as Synapse on PostgreSQL)
        "mary jane watson m j w mary jane watson mjw nobody",
        # empty-ish
        "", " ", "!!!", "@", ":", "-",
        # infix (matches only inside words)
        "lex", "exa", "ander", "atson", "lexer", "rien", "mit", "ice wal",
    ]
    # fmt: on


def expected_additions(
    model: Model, dialect: str, searcher: Person, term: str, synapse: set[str]
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """What each allowance adds to Synapse's answer, from the model alone: (must, may)."""
    visible = model.visible_to(searcher)
    guests = model.guests()
    prefix = model.prefix_matches(term, MAX_WORDS)
    must: dict[str, set[str]] = {}
    may: dict[str, set[str]] = {}
    if len(words(term)) > MAX_WORDS:
        must[TEN_WORDS.name] = (prefix & visible) - guests - synapse
    infix: set[str] = set()
    if dialect in INFIX_BACKENDS:
        infix = model.infix_matches(term) - prefix
        must[INFIX.name] = (infix & visible) - guests - synapse
    may[GUESTS.name] = ((prefix | infix) & visible & guests) - synapse
    return must, may


def differences(
    model: Model,
    dialect: str,
    synapse: dict[tuple[str, str], Answer],
    ours: dict[tuple[str, str], Answer],
) -> tuple[list[str], dict[str, int]]:
    """Every (searcher, term) where ours is not Synapse's answer plus the allowances, and
    how many searches each allowance changed."""
    found: list[str] = []
    used: dict[str, int] = {a.name: 0 for a in ALLOWANCES}
    for (key, term), theirs in synapse.items():
        mine = ours[(key, term)]
        searcher = model.people[key]
        where = f"searcher {searcher.user_id}, term {term!r}"
        if (theirs.status, theirs.errcode) != (mine.status, mine.errcode):
            found.append(
                f"{where}: Synapse {theirs.status} {theirs.errcode}, "
                f"ours {mine.status} {mine.errcode}"
            )
            continue
        if theirs.status != 200:
            continue
        if theirs.limited or mine.limited:
            found.append(f"{where}: limited (Synapse {theirs.limited}, ours {mine.limited})")
        syn, got = set(theirs.hits), set(mine.hits)
        must, may = expected_additions(model, dialect, searcher, term, syn)
        required = syn.union(*must.values())
        allowed = required.union(*may.values())
        if not required <= got <= allowed:
            found.append(
                f"{where}: Synapse {sorted(syn)}, ours {sorted(got)}; ours lacks "
                f"{sorted(required - got)}, ours adds {sorted(got - allowed)} "
                f"(allowances: must {_nonempty(must)}, may {_nonempty(may)})"
            )
        for name, users in (*must.items(), *may.items()):
            if users & got:
                used[name] += 1
        for user_id in sorted(syn & got):
            if theirs.hits[user_id] != mine.hits[user_id]:
                found.append(
                    f"{where}: {user_id} is {theirs.hits[user_id]} on Synapse, "
                    f"{mine.hits[user_id]} here (display name, avatar)"
                )
            elif theirs.hits[user_id][0] is None:
                used[PLACEHOLDER_HAS_NO_NAME.name] += 1
    return found, used


def _nonempty(allowances: dict[str, set[str]]) -> dict[str, list[str]]:
    return {name: sorted(users) for name, users in allowances.items() if users}


def _converged(model: Model, ask: Callable[[Person, str], Answer]) -> str | None:
    """None once `ask` shows, for each searcher, every user the model says it may see
    with their global name and avatar (and nobody unlisted); else what is missing."""
    for searcher in model.people.values():
        if searcher.unlisted or searcher.guest or searcher.local_on != model.hs1.server_name:
            continue
        for term in (searcher.local_on, model.people["ralice"].local_on):
            server = term.split(":")[0]
            expected = {
                p.user_id: (p.name, p.avatar)
                for p in model.listed()
                if p.user_id in model.visible_to(searcher) and p.local_on == term and not p.guest
            }
            answer = ask(searcher, server)
            got = {u: v for u, v in answer.hits.items() if u.endswith(":" + term)}
            unlisted = {p.user_id for p in model.people.values() if p.unlisted}
            if any(got.get(u) != v for u, v in expected.items()) or unlisted & set(got):
                return f"{searcher.user_id} searching {server!r}: {got}, expected {expected}"
    return None


def wait_converged(
    model: Model, ask: Callable[[Person, str], Answer], who: str, timeout: float
) -> None:
    last: list[str | None] = [None]

    def done() -> bool:
        last[0] = _converged(model, ask)
        return last[0] is None

    try:
        wait_until(done, timeout, interval=0.5, what=who)
    except TimeoutError as exc:
        raise AssertionError(f"{who} never converged: {last[0]}") from exc


def stable_synapse_answers(
    client: Searcher, asks: list[tuple[Person, str]], timeout: float = 60
) -> dict[tuple[str, str], Answer]:
    """Synapse's answers once two sweeps in a row agree (its directory is updated by a
    background process)."""
    deadline = time.monotonic() + timeout
    previous = client.sweep(client.synapse, asks)
    while True:
        current = client.sweep(client.synapse, asks)
        if current == previous:
            return current
        assert time.monotonic() < deadline, "Synapse's own directory never settled"
        previous = current
        time.sleep(1)


# A guest is refused before the term is read: a few terms show it.
GUEST_TERMS = ("alexander", "", "a")


def test_same_answers_as_synapse(federation_with_guests: Deployment) -> None:
    testbed = federation_with_guests
    dialect = testbed.engine.dialect.name
    started = time.monotonic()
    model = build_state(testbed)
    built = time.monotonic()
    client = Searcher(testbed)
    terms = terms_for(model)
    asks = [
        (p, term)
        for p in model.people.values()
        if p.local_on == model.hs1.server_name and not p.unlisted
        for term in (GUEST_TERMS if p.guest else terms)
    ]

    # Ours first: Synapse's delayed fetch of a remote user seen only in a private room
    # (a minute after the join) runs meanwhile.
    wait_converged(model, client.ours, "our directory", timeout=60)
    ours = client.sweep(client.ours, asks)
    ours_done = time.monotonic()
    wait_converged(model, client.synapse, "Synapse's own directory", timeout=100)
    synapse = stable_synapse_answers(client, asks)
    assert client.sweep(client.ours, asks) == ours, "our answers moved after convergence"

    found, used = differences(model, dialect, synapse, ours)
    print(
        f"\n{dialect}: {len(asks)} searches on each side; build {built - started:.1f} s, "
        f"ours converged and swept {ours_done - built:.1f} s, Synapse converged and "
        f"stable {time.monotonic() - ours_done:.1f} s; allowances used: {used}"
    )
    assert not found, f"{len(found)} differences from Synapse:\n" + "\n".join(found)

    # The guest: both refuse it in the same words.
    guest = model.people["guest"]
    for term in GUEST_TERMS:
        assert synapse[(guest.key, term)].status == 403
        assert synapse[(guest.key, term)].errcode == "M_GUEST_ACCESS_FORBIDDEN"
    # The comparison saw what it was built to see.
    mary = model.people["mjw"]
    assert synapse[(mary.key, "nameless")].hits == {model.people["nameless"].user_id: (None, None)}
