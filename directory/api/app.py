"""The HTTP server: appservice transactions in, user-directory search out, plus health
and metrics. Database work runs in a thread pool; nothing slow (profile fetching)
happens inside a request.

A transaction is only accepted here (stored durably in the inbox, directory/ingest.py);
the workers apply it. The app does not publish Celery tasks itself (the domain never
imports Celery): the entry point hands it a `wake` callable, run after the answer to
each accepted transaction.

Every answer is Matrix JSON with an errcode, whatever the input: bodies and tokens are
checked before use (directory/api/body.py, auth.py), a database failure is a 503 and
anything unforeseen a JSON 500 (errors.LastResort).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, text
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from directory.api.auth import TokenVerifier, address_key
from directory.api.body import bearer_token, read_json_object
from directory.api.errors import (
    LastResort,
    MatrixError,
    database_unavailable,
    describe_database_error,
    is_database_unavailable,
    limit_exceeded,
)
from directory.api.health import HomeserverProbe
from directory.api.metrics import Metrics
from directory.api.ratelimit import RateLimiter
from directory.clock import now_ms
from directory.config import Settings
from directory.ingest import Wake, accept_transaction
from directory.search import search_directory
from directory.text import has_control_characters

logger = logging.getLogger(__name__)

MAX_TXN_ID_LENGTH = 255
MAX_SEARCH_BODY_BYTES = 64 * 1024
DEFAULT_SEARCH_LIMIT = 10
# Control characters and lone surrogates: no stored name or id holds one (directory/
# text.py), and a NUL or a surrogate cannot even be sent to PostgreSQL.
_UNSEARCHABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def parse_limit(body: dict[str, Any], maximum: int) -> int:
    """`limit` as Synapse reads it (`int(body.get("limit", 10))`, clamped to 0..50):
    10, "10", 10.0 and 10.9 are 10; 2**70 is the maximum, -1 is 0. Unlike Synapse, a
    value int() cannot take (null, "abc", "1.5", [], {}, Infinity from 1e309, NaN) is a
    400 M_INVALID_PARAM, not an internal error, and so is a boolean: Synapse takes true
    as 1 only because Python's bool is an int; no client means a limit by it."""
    value = body.get("limit", DEFAULT_SEARCH_LIMIT)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MatrixError(400, "M_INVALID_PARAM", "limit must be an integer")
    try:
        number = int(value)
    except (ValueError, OverflowError) as exc:
        raise MatrixError(400, "M_INVALID_PARAM", "limit must be an integer") from exc
    return max(0, min(number, maximum))


def parse_search_term(body: dict[str, Any]) -> str:
    """`search_term`, required, a string. Synapse answers a missing one with 400
    M_UNKNOWN and passes any other JSON value on to its search; here missing is 400
    M_MISSING_PARAM and a non-string 400 M_INVALID_PARAM. Control characters and lone
    surrogates separate words like spaces (no entry can contain them)."""
    if "search_term" not in body:
        raise MatrixError(400, "M_MISSING_PARAM", "search_term is required")
    term = body["search_term"]
    if not isinstance(term, str):
        raise MatrixError(400, "M_INVALID_PARAM", "search_term must be a string")
    return _UNSEARCHABLE.sub(" ", term)


def create_app(
    settings: Settings,
    engine: Engine,
    redis_client: aioredis.Redis,
    wake: Wake,
    verifier: TokenVerifier | None = None,
    search_engine: Engine | None = None,
) -> Starlette:
    """`search_engine`: the pool searches use (server.py gives them one of their own,
    SEARCH_POOL_SIZE); `engine` when not given."""
    search_engine = search_engine or engine
    unverified = RateLimiter(
        redis_client,
        settings.search_unverified_rate_per_second,
        settings.search_unverified_rate_burst,
    )
    verifier = verifier or TokenVerifier(settings, limiter=unverified)
    probe = HomeserverProbe(settings)
    limiter = RateLimiter(redis_client, settings.search_rate_per_second, settings.search_rate_burst)
    metrics = Metrics()
    hs_token = settings.hs_token.encode()

    def check_homeserver(request: Request) -> None:
        token = bearer_token(request)
        if not hs_token or token is None or not hmac.compare_digest(token.encode(), hs_token):
            raise MatrixError(403, "M_FORBIDDEN", "Bad hs_token")

    async def put_transaction(request: Request) -> Response:
        check_homeserver(request)
        txn_id = request.path_params["txn_id"]
        if len(txn_id) > MAX_TXN_ID_LENGTH:
            raise MatrixError(400, "M_INVALID_PARAM", "transaction id too long")
        if has_control_characters(txn_id):
            raise MatrixError(400, "M_INVALID_PARAM", "transaction id has control characters")
        body = await read_json_object(request, settings.max_transaction_bytes)
        events = body.get("events", [])
        if not isinstance(events, list):
            raise MatrixError(400, "M_BAD_JSON", "events must be a list")
        # Committed before we answer: the homeserver may forget the transaction then.
        # The workers apply it (directory/ingest.py), woken once the answer is sent: the
        # wake-up is best effort (reconciliation covers a lost one), the answer is not.
        accepted = await run_in_threadpool(accept_transaction, engine, events, txn_id)
        if not accepted:
            metrics.transactions.labels("replayed").inc()
            return JSONResponse({})
        metrics.transactions.labels("accepted").inc()
        metrics.events.labels("accepted").inc(len(events))
        return JSONResponse({}, background=BackgroundTask(wake))

    async def ping(request: Request) -> Response:
        check_homeserver(request)
        return JSONResponse({})

    async def query_unknown(request: Request) -> Response:
        # We create no users or rooms: whatever the homeserver asks about is unknown.
        check_homeserver(request)
        raise MatrixError(404, "M_NOT_FOUND", "This appservice provides no users or rooms")

    def run_search(searcher: str, term: str, limit: int) -> dict[str, Any]:
        # limit 0 is searched too: `limited` says whether anything matched.
        with search_engine.connect() as conn:
            result = search_directory(
                conn,
                searcher,
                term,
                limit,
                search_all_users=settings.search_all_users,
                exclude_remote_users=settings.exclude_remote_users,
                prefer_local_users=settings.prefer_local_users,
                server_name=settings.server_name,
                statement_timeout_ms=settings.search_statement_timeout_ms,
            )
        hits = []
        for hit in result.results:
            item: dict[str, Any] = {"user_id": hit.user_id}
            # A placeholder entry (no public profile) has no display_name: the client
            # shows the user id. Placeholders come as None or as the user id itself.
            name = hit.display_name
            if isinstance(name, str) and name and name != hit.user_id:
                item["display_name"] = name
            if hit.avatar_url is not None:
                item["avatar_url"] = hit.avatar_url
            hits.append(item)
        return {"results": hits, "limited": result.limited}

    async def post_search(request: Request) -> Response:
        # Every search is counted by the status it is answered with, errors included
        # (not one whose client went away mid-request: it is answered with nothing).
        status: str | None = None
        try:
            response = await answer_search(request)
            status = str(response.status_code)
            return response
        except MatrixError as exc:
            status = str(exc.status)
            raise
        except Exception as exc:
            if is_database_unavailable(exc):
                # An outage or a statement timeout, not a bug: 503, one log line.
                logger.warning("search: database unavailable (%s)", describe_database_error(exc))
                error = database_unavailable(exc)
                status = str(error.status)
                raise error from exc
            status = "500"  # answered by errors.LastResort
            raise
        finally:
            if status is not None:
                metrics.searches.labels(status).inc()

    async def answer_search(request: Request) -> Response:
        started = time.perf_counter()
        # Behind a reverse proxy, uvicorn has put X-Forwarded-For here (server.py).
        address = address_key(request.client.host if request.client else None)
        requester = await verifier.requester_for(bearer_token(request), address)
        if requester.is_guest:
            raise MatrixError(403, "M_GUEST_ACCESS_FORBIDDEN", "Guest access not allowed")
        searcher = requester.user_id
        wait = await limiter.take(f"search:{searcher}")
        if wait is not None:
            raise limit_exceeded(wait)
        if not settings.directory_enabled:
            # As Synapse with user_directory.enabled false: after auth, body unread.
            return JSONResponse({"results": [], "limited": False})
        body = await read_json_object(request, MAX_SEARCH_BODY_BYTES, strict=True)
        limit = parse_limit(body, settings.search_max_limit)
        term = parse_search_term(body)
        answer = await run_in_threadpool(run_search, searcher, term, limit)
        metrics.search_seconds.observe(time.perf_counter() - started)
        return JSONResponse(answer)

    def check_database() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def health(_request: Request) -> Response:
        # Our homeserver too: without it (down, or refusing AS_TOKEN) no room can be
        # read and no profile fetched, and the reason is ours to fix.
        status: dict[str, str] = {"homeserver": await probe.status()}
        # Each check is tried twice: the first attempt after a restart of the database
        # or Redis meets a pooled connection that died with it, which the pool then
        # replaces; only a second failure is an outage.
        for name, check in (
            ("database", lambda: run_in_threadpool(check_database)),
            ("redis", redis_client.ping),
        ):
            for _ in range(2):
                try:
                    await check()
                    status[name] = "ok"
                    break
                except Exception as exc:  # any failure is "not healthy", with its reason
                    status[name] = f"error: {type(exc).__name__}"
        healthy = all(v == "ok" for v in status.values())
        return JSONResponse(status, status_code=200 if healthy else 503)

    def read_gauges() -> None:
        with engine.connect() as conn:
            metrics.refresh(conn, now_ms())

    async def prometheus(_request: Request) -> Response:
        try:
            await run_in_threadpool(read_gauges)
        except Exception:
            logger.warning("metrics: database unreachable", exc_info=True)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def matrix_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MatrixError)
        return exc.response()

    async def not_found(_request: Request, _exc: Exception) -> Response:
        return MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request").response()

    async def method_not_allowed(_request: Request, _exc: Exception) -> Response:
        return MatrixError(405, "M_UNRECOGNIZED", "Method not allowed").response()

    @asynccontextmanager
    async def lifespan(_app: Starlette):
        yield
        await verifier.close()
        await probe.close()

    routes = [
        Route("/_matrix/app/v1/transactions/{txn_id}", put_transaction, methods=["PUT"]),
        # Homeservers from before the v1 prefix.
        Route("/transactions/{txn_id}", put_transaction, methods=["PUT"]),
        Route("/_matrix/app/v1/ping", ping, methods=["POST"]),
        Route("/_matrix/app/v1/users/{user_id}", query_unknown, methods=["GET"]),
        Route("/_matrix/app/v1/rooms/{alias}", query_unknown, methods=["GET"]),
        Route("/users/{user_id}", query_unknown, methods=["GET"]),
        Route("/rooms/{alias}", query_unknown, methods=["GET"]),
        Route("/_matrix/client/v3/user_directory/search", post_search, methods=["POST"]),
        Route("/_matrix/client/r0/user_directory/search", post_search, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        # Browser clients (Element Web) call search from another origin, as they do
        # the homeserver's own endpoints.
        # LastResort inside CORS, so that its answers carry the CORS headers too.
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=["*"],
                allow_methods=["GET", "POST", "PUT", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "X-Requested-With"],
            ),
            Middleware(LastResort),
        ],
        exception_handlers={MatrixError: matrix_error, 404: not_found, 405: method_not_allowed},
        lifespan=lifespan,
    )
