"""4. Search: latency of the HTTP endpoint as the directory grows (10k, 100k, 1M).

Entries and memberships are bulk-loaded (bench.load) level by level: at each step the
secondary indexes are dropped, the new rows copied in, the indexes rebuilt exactly as
the migrations define them (read back from pg_indexes) and the tables analysed, as a
directory that grew to that size would be. Searchers are local users in a few private
rooms of 50 and one public room, so both visibility paths (in_public_room and the
shared-private-room subquery) are exercised.

Terms follow what people type: first-name prefixes, whole first names, full names,
surname prefixes, localpart prefixes and whole user ids of existing users, and a few
misses. Every level gets the same mix; searches run one at a time over HTTP after a
warm-up, each timed at the client. Infix terms are measured apart, in the same run:
3-5 characters from inside first names, surnames and localparts of existing users
("lex" of Alexander), which find little by prefix and so reach the infix tier (trigram
indexes, migration 0008). Target, for prefix and for infix terms each: p99 at the
largest size at most twice the p99 at the smallest. The plans of a typical query and
of a typical infix query are captured with EXPLAIN (ANALYZE, BUFFERS).
"""

from __future__ import annotations

import random
import string
import time
from typing import Any

import httpx

from bench.context import Context, percentile
from bench.load import SEARCHERS, load_search_entries, searcher, secondary_indexes
from bench.population import FIRST_NAMES, LAST_NAMES

WARMUP = 50
TYPICAL_TERM = "mar"
# Inside "Alexander", "Alexis", "Alex"...: few names start with it, many contain it.
TYPICAL_INFIX_TERM = "lex"
# Infix searches per level, as a share of the prefix searches.
INFIX_SHARE = 0.5


def run(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    ctx.reset_state()
    levels: list[dict[str, Any]] = []
    loaded = 0
    samples: list[str] = []
    for level in sorted(sizes.search_sizes):
        print(f"  search: loading {level:,} entries")
        started = time.perf_counter()
        samples += _grow(ctx, loaded, level)
        load_seconds = time.perf_counter() - started
        loaded = level
        terms = _terms(samples, WARMUP + sizes.search_queries)
        timings, hits, limited = _search(ctx, terms)
        timed = timings[WARMUP:]
        infix_terms = _infix_terms(samples, WARMUP + int(sizes.search_queries * INFIX_SHARE))
        infix_timings, infix_hits, infix_limited = _search(ctx, infix_terms)
        infix_timed = infix_timings[WARMUP:]
        plan, plan_ms = _explain(ctx, TYPICAL_TERM)
        infix_plan, infix_plan_ms = _explain(ctx, TYPICAL_INFIX_TERM)
        levels.append(
            {
                "entries": level,
                "load_seconds": load_seconds,
                "queries": len(timed),
                "p50_ms": percentile(timed, 50),
                "p90_ms": percentile(timed, 90),
                "p99_ms": percentile(timed, 99),
                "max_ms": max(timed),
                "mean_results": sum(hits[WARMUP:]) / len(timed),
                "limited_share": sum(limited[WARMUP:]) / len(timed),
                "explain_term": TYPICAL_TERM,
                "explain_execution_ms": plan_ms,
                "explain": plan,
                "infix": {
                    "queries": len(infix_timed),
                    "p50_ms": percentile(infix_timed, 50),
                    "p90_ms": percentile(infix_timed, 90),
                    "p99_ms": percentile(infix_timed, 99),
                    "max_ms": max(infix_timed),
                    "mean_results": sum(infix_hits[WARMUP:]) / len(infix_timed),
                    "limited_share": sum(infix_limited[WARMUP:]) / len(infix_timed),
                    "explain_term": TYPICAL_INFIX_TERM,
                    "explain_execution_ms": infix_plan_ms,
                    "explain": infix_plan,
                },
            }
        )
    ratio = levels[-1]["p99_ms"] / levels[0]["p99_ms"]
    infix_ratio = levels[-1]["infix"]["p99_ms"] / levels[0]["infix"]["p99_ms"]
    return {
        "levels": levels,
        "ratio": ratio,
        "infix_ratio": infix_ratio,
        "target": 2.0,
        "prefix_pass": ratio <= 2.0,
        "infix_pass": infix_ratio <= 2.0,
        "pass": ratio <= 2.0 and infix_ratio <= 2.0,
    }


def _grow(ctx: Context, start: int, end: int) -> list[str]:
    with ctx.db.connect() as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        rebuild = start > 0
        indexes = secondary_indexes(conn, ["user_directory", "room_members"]) if rebuild else []
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        samples = load_search_entries(conn, start, end)
        for _, definition in indexes:
            conn.execute(definition)
        conn.commit()
    with ctx.db.connect(autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE rooms, room_members, user_directory")
    return samples


def _terms(samples: list[str], count: int) -> list[str]:
    """The same mix at every level (seeded), drawn from names and existing users."""
    rng = random.Random(42)
    terms = []
    for _ in range(count):
        roll = rng.random()
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        user = rng.choice(samples)
        localpart = user[1:].partition(":")[0]
        if roll < 0.30:
            terms.append(first[: rng.randint(2, 4)].lower())
        elif roll < 0.50:
            terms.append(first)
        elif roll < 0.60:
            terms.append(f"{first} {last}")
        elif roll < 0.70:
            terms.append(last[: rng.randint(3, 5)].lower())
        elif roll < 0.85:
            terms.append(localpart[: rng.randint(4, 8)])
        elif roll < 0.95:
            terms.append(user)
        else:
            terms.append("".join(rng.choice(string.ascii_lowercase) for _ in range(6)))
    return terms


def _infix_terms(samples: list[str], count: int) -> list[str]:
    """3-5 characters from inside names and localparts (never their start), seeded:
    the same mix at every level."""
    rng = random.Random(43)
    terms = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.4:
            source = rng.choice(FIRST_NAMES).lower()
        elif roll < 0.7:
            source = rng.choice(LAST_NAMES).lower()
        else:
            source = rng.choice(samples)[1:].partition(":")[0]
        length = rng.randint(3, 5)
        while len(source) < length + 1:
            source += rng.choice(LAST_NAMES).lower()
        start = rng.randint(1, len(source) - length)
        terms.append(source[start : start + length])
    return terms


def _search(ctx: Context, terms: list[str]) -> tuple[list[float], list[int], list[bool]]:
    tokens = [f"bench:{searcher(k)}" for k in range(SEARCHERS)]
    timings: list[float] = []
    hits: list[int] = []
    limited: list[bool] = []
    with httpx.Client(base_url=ctx.server_url, timeout=60) as client:
        for i, term in enumerate(terms):
            started = time.perf_counter()
            response = client.post(
                "/_matrix/client/v3/user_directory/search",
                json={"search_term": term, "limit": 10},
                headers={"Authorization": f"Bearer {tokens[i % len(tokens)]}"},
            )
            timings.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise RuntimeError(
                    f"search {term!r}: HTTP {response.status_code} {response.text[:200]}"
                )
            body = response.json()
            hits.append(len(body["results"]))
            limited.append(bool(body["limited"]))
    return timings, hits, limited


def _explain(ctx: Context, term: str) -> tuple[str, float]:
    """EXPLAIN (ANALYZE, BUFFERS) of both statements a search runs (directory.search),
    with the settings search_directory sets. Returns the text and the summed
    execution time."""
    from sqlalchemy.dialects import postgresql

    from directory.search import search_queries

    queries = search_queries(searcher(0), term, 10)
    assert queries is not None
    parts = []
    total = 0.0
    statements = [("leading tiers (0-3)", queries.leading), ("tier 4", queries.rest)]
    if queries.infix is not None:
        statements.append(("tier 5 (infix)", queries.infix))
    with ctx.db.connect(autocommit=True) as conn:
        conn.execute("SET jit = off")
        for label, statement in statements:
            sql = str(
                statement.compile(
                    dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
                )
            )
            # Empty parameters: psycopg then turns the compiler's '%%' back into '%'.
            rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, ()).fetchall()
            text = "\n".join(r[0] for r in rows)
            for r in rows:
                if r[0].startswith("Execution Time:"):
                    total += float(r[0].split()[2])
            parts.append(f"-- {label}: search_term={term!r}, searcher={searcher(0)}\n{text}")
    return "\n\n".join(parts), total
