"""Matrix-style JSON errors: {"errcode", "error"} with the right HTTP status, for every
answer we give, including the ones nobody planned for.

MatrixError is raised by handlers and answered by the app's exception handler. Two
kinds of failure are not: the database being away or too slow (a dropped connection,
a statement timeout, a full pool), answered 503 with Retry-After, and anything else
unexpected, answered 500. Both are JSON `M_UNKNOWN` errors (Starlette's own last
resort answers plain text), by `LastResort`, the outermost middleware of our own.
"""

from __future__ import annotations

import logging
import math

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

# What a client is asked to wait after the database failed it (a timeout, a restart).
DATABASE_RETRY_AFTER_SECONDS = 2


class MatrixError(Exception):
    def __init__(
        self,
        status: int,
        errcode: str,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"errcode": self.errcode, "error": self.message, **self.extra},
            status_code=self.status,
            headers=self.headers,
        )


def limit_exceeded(wait_seconds: float) -> MatrixError:
    """429 M_LIMIT_EXCEEDED, saying how long to wait (header and body)."""
    return MatrixError(
        429,
        "M_LIMIT_EXCEEDED",
        "Too many requests",
        headers={"Retry-After": str(max(1, math.ceil(wait_seconds)))},
        retry_after_ms=max(1, int(wait_seconds * 1000)),
    )


def is_database_unavailable(exc: BaseException) -> bool:
    """The database failed the request, not our code: a lost or refused connection,
    a statement timeout (psycopg's QueryCanceled, wrapped in an OperationalError),
    SQLite's "database is locked", a pool with no connection free in time."""
    return isinstance(exc, DBAPIError | PoolTimeoutError)


def describe_database_error(exc: BaseException) -> str:
    """One line naming the failure: the driver's error and the first line of its
    message, never SQLAlchemy's full text (it quotes the statement's parameters)."""
    orig = getattr(exc, "orig", None) or exc
    first_line = (str(orig).strip().splitlines() or [""])[0][:200]
    return f"{type(orig).__name__}: {first_line}" if first_line else type(orig).__name__


def database_unavailable(exc: BaseException) -> MatrixError:
    return MatrixError(
        503,
        "M_UNKNOWN",
        "The directory's database is unavailable; try again shortly",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
    )


class LastResort:
    """Pure ASGI middleware: an exception that escaped every handler is answered with
    a Matrix JSON error instead of Starlette's plain-text 500. A database failure is a
    503 logged in one line (it is an outage, not a bug); anything else is a 500 logged
    with its traceback (it is a bug)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if is_database_unavailable(exc):
                logger.warning(
                    "%s %s: database unavailable (%s)",
                    scope.get("method"),
                    scope.get("path"),
                    describe_database_error(exc),
                )
                error = database_unavailable(exc)
            else:
                logger.error(
                    "%s %s: unexpected error", scope.get("method"), scope.get("path"), exc_info=exc
                )
                error = MatrixError(500, "M_UNKNOWN", "Internal server error")
            if started:
                # Half an answer is out: nothing sensible can follow it.
                return
            await error.response()(scope, receive, send)
