"""Deterministic synthetic people: servers with Zipf-like sizes, realistic names.

Both the fake homeserver (which answers profiles) and the harness (which checks that
the directory converged to them) derive a user's public profile from the user id
alone, so neither has to ship a table of 20,000 profiles to the other.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# Our homeserver's name in every benchmark: its users are "local".
LOCAL_SERVER = "bench.local"

FIRST_NAMES = [
    "Aaron",
    "Abigail",
    "Adam",
    "Adrian",
    "Aisha",
    "Alan",
    "Albert",
    "Alex",
    "Alexander",
    "Alice",
    "Alicia",
    "Amanda",
    "Amelia",
    "Amir",
    "Amy",
    "Ana",
    "Andrea",
    "Andrew",
    "Angela",
    "Anna",
    "Anthony",
    "Antonio",
    "Arjun",
    "Arthur",
    "Ava",
    "Barbara",
    "Beatriz",
    "Ben",
    "Benjamin",
    "Bianca",
    "Bruno",
    "Camila",
    "Carla",
    "Carlos",
    "Caroline",
    "Catherine",
    "Charles",
    "Charlotte",
    "Chen",
    "Chloe",
    "Chris",
    "Christian",
    "Claire",
    "Clara",
    "Daniel",
    "David",
    "Deborah",
    "Diana",
    "Diego",
    "Dmitri",
    "Dorothy",
    "Edward",
    "Elena",
    "Eli",
    "Elijah",
    "Elizabeth",
    "Ella",
    "Emily",
    "Emma",
    "Eric",
    "Ethan",
    "Eva",
    "Fatima",
    "Felix",
    "Fernando",
    "Fiona",
    "Francesca",
    "Frank",
    "Gabriel",
    "George",
    "Grace",
    "Hannah",
    "Harper",
    "Harry",
    "Hassan",
    "Helen",
    "Henry",
    "Hiroshi",
    "Hugo",
    "Ian",
    "Igor",
    "Isabel",
    "Isabella",
    "Isaac",
    "Ivan",
    "Jack",
    "Jacob",
    "James",
    "Jane",
    "Jasmine",
    "Javier",
    "Jennifer",
    "Jessica",
    "Joao",
    "John",
    "Jonas",
    "Jorge",
    "Jose",
    "Joseph",
    "Joshua",
    "Julia",
    "Julian",
    "Kai",
    "Karen",
    "Kate",
    "Katherine",
    "Kenji",
    "Kevin",
    "Laura",
    "Lauren",
    "Leo",
    "Liam",
    "Lily",
    "Linda",
    "Lisa",
    "Lucas",
    "Lucia",
    "Luis",
    "Luna",
    "Maria",
    "Mariam",
    "Mark",
    "Marta",
    "Martin",
    "Mary",
    "Mateo",
    "Matthew",
    "Maya",
    "Mei",
    "Mia",
    "Michael",
    "Michelle",
    "Mohammed",
    "Nadia",
    "Natalia",
    "Nathan",
    "Nicholas",
    "Nina",
    "Noah",
    "Nora",
    "Olga",
    "Oliver",
    "Olivia",
    "Omar",
    "Oscar",
    "Pablo",
    "Patricia",
    "Paul",
    "Pedro",
    "Peter",
    "Priya",
    "Rachel",
    "Rafael",
    "Rahul",
    "Raj",
    "Rebecca",
    "Ricardo",
    "Robert",
    "Rosa",
    "Ryan",
    "Sakura",
    "Samuel",
    "Sara",
    "Sarah",
    "Sebastian",
    "Sergei",
    "Sofia",
    "Sophie",
    "Stefan",
    "Steven",
    "Susan",
    "Takeshi",
    "Thomas",
    "Tim",
    "Tom",
    "Valentina",
    "Victor",
    "Victoria",
    "Walter",
    "William",
    "Yuki",
    "Yusuf",
    "Zara",
    "Zoe",
    "Zoltan",
]
LAST_NAMES = [
    "Abbott",
    "Adams",
    "Ahmed",
    "Ali",
    "Allen",
    "Alvarez",
    "Anderson",
    "Andersson",
    "Baker",
    "Barnes",
    "Becker",
    "Bell",
    "Bennett",
    "Brown",
    "Bruno",
    "Campbell",
    "Carter",
    "Castro",
    "Chen",
    "Clark",
    "Cohen",
    "Collins",
    "Cook",
    "Cooper",
    "Costa",
    "Cruz",
    "Davies",
    "Davis",
    "Diaz",
    "Dubois",
    "Edwards",
    "Evans",
    "Fernandes",
    "Fischer",
    "Fisher",
    "Flores",
    "Garcia",
    "Gomez",
    "Gonzalez",
    "Gray",
    "Green",
    "Gupta",
    "Hall",
    "Hansen",
    "Harris",
    "Hernandez",
    "Hill",
    "Hoffmann",
    "Hughes",
    "Ivanov",
    "Jackson",
    "Jensen",
    "Johansson",
    "Johnson",
    "Jones",
    "Kaur",
    "Kelly",
    "Khan",
    "Kim",
    "King",
    "Klein",
    "Kowalski",
    "Kumar",
    "Larsen",
    "Lee",
    "Lewis",
    "Li",
    "Lopez",
    "Martin",
    "Martinez",
    "Meyer",
    "Miller",
    "Mitchell",
    "Moore",
    "Morales",
    "Morgan",
    "Morris",
    "Muller",
    "Murphy",
    "Nakamura",
    "Nguyen",
    "Nielsen",
    "Novak",
    "Okafor",
    "Olsen",
    "Ortiz",
    "Park",
    "Patel",
    "Perez",
    "Peterson",
    "Petrov",
    "Phillips",
    "Popescu",
    "Ramirez",
    "Reyes",
    "Richter",
    "Rivera",
    "Roberts",
    "Robinson",
    "Rodriguez",
    "Rossi",
    "Russo",
    "Sanchez",
    "Santos",
    "Sato",
    "Schmidt",
    "Schneider",
    "Schulz",
    "Scott",
    "Silva",
    "Singh",
    "Smith",
    "Sousa",
    "Stewart",
    "Suzuki",
    "Tanaka",
    "Taylor",
    "Thomas",
    "Thompson",
    "Torres",
    "Turner",
    "Wagner",
    "Walker",
    "Wang",
    "Ward",
    "Watanabe",
    "Weber",
    "White",
    "Williams",
    "Wilson",
    "Wong",
    "Wood",
    "Wright",
    "Yamamoto",
    "Yang",
    "Young",
    "Zhang",
    "Zhao",
    "Zimmermann",
]


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def person_name(seed: str) -> tuple[str, str]:
    """A (first, last) name chosen from the seed, the same on every run and process."""
    h = _digest(seed)
    return FIRST_NAMES[h % len(FIRST_NAMES)], LAST_NAMES[(h >> 20) % len(LAST_NAMES)]


def public_profile(user_id: str, version: int = 0) -> dict[str, str]:
    """What the fake homeserver answers for this user's public profile.

    `version` > 0 is a later global rename (the dedup and steady-state runs bump it).
    """
    first, last = person_name(user_id)
    name = f"{first} {last}" if version == 0 else f"{first} {last} v{version}"
    return {
        "displayname": name,
        "avatar_url": f"mxc://{user_id.partition(':')[2]}/{_digest(name + user_id):016x}",
    }


def localpart_for(index: int, rng: random.Random) -> str:
    """A realistic localpart: 'alice.smith42', 'asmith', 'alice_w'..."""
    first, last = (
        FIRST_NAMES[rng.randrange(len(FIRST_NAMES))],
        LAST_NAMES[rng.randrange(len(LAST_NAMES))],
    )
    style = rng.randrange(4)
    if style == 0:
        base = f"{first}.{last}"
    elif style == 1:
        base = f"{first[0]}{last}"
    elif style == 2:
        base = f"{first}_{last[0]}"
    else:
        base = first
    # The index keeps every localpart unique without a lookup.
    return f"{base.lower()}{index}"


def zipf_sizes(total: int, servers: int, largest_share: float = 0.15) -> list[int]:
    """Integer sizes s_1 >= s_2 >= ... summing to `total`, proportional to 1/rank^a
    with `a` chosen so the largest holds about `largest_share` of everyone, and every
    server at least one user."""
    if servers <= 1:
        return [total]

    def share(a: float) -> float:
        weights = [1 / (rank**a) for rank in range(1, servers + 1)]
        return weights[0] / sum(weights)

    low, high = 0.0, 4.0
    for _ in range(60):  # bisection: share() grows with a
        mid = (low + high) / 2
        if share(mid) < largest_share:
            low = mid
        else:
            high = mid
    weights = [1 / (rank**low) for rank in range(1, servers + 1)]
    scale = (total - servers) / sum(weights)
    raw = [w * scale for w in weights]
    sizes = [1 + int(r) for r in raw]
    # Largest remainders get the users lost to rounding down.
    order = sorted(range(servers), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


@dataclass(frozen=True)
class Population:
    """Remote users spread over servers. Server names are shuffled against their sizes,
    so that an algorithm ordering servers by name (the reference does) is neither
    favoured nor punished by our naming."""

    users: list[str]
    by_server: dict[str, list[str]]

    @property
    def sizes(self) -> dict[str, int]:
        return {server: len(users) for server, users in self.by_server.items()}


def make_population(
    total: int, servers: int, seed: int = 1, largest_share: float = 0.15
) -> Population:
    rng = random.Random(seed)
    sizes = zipf_sizes(total, servers, largest_share)
    names = [f"hs{i:03d}.example" for i in range(servers)]
    rng.shuffle(names)
    by_server: dict[str, list[str]] = {}
    users: list[str] = []
    index = 0
    for name, size in zip(names, sizes, strict=True):
        members = []
        for _ in range(size):
            members.append(f"@{localpart_for(index, rng)}:{name}")
            index += 1
        by_server[name] = members
        users.extend(members)
    return Population(users=users, by_server=by_server)
