"""What every command needs: the database and Redis, reached or one clear line why not."""

from __future__ import annotations

import datetime

import redis
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from cli import CommandError
from directory.config import Settings
from directory.db import make_engine, normalise_url


def _safe_url(url: str) -> str:
    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except Exception:
        return "DATABASE_URL"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def open_database(settings: Settings) -> Engine:
    """The engine, once the database answers and is migrated."""
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            migrated = inspect(conn).has_table("bootstrap_runs")
    except SQLAlchemyError as exc:
        raise CommandError(
            f"cannot reach the database at {_safe_url(settings.database_url)}:"
            f" {_first_line(exc.orig or exc)}"
        ) from exc
    if not migrated:
        raise CommandError("the database is not migrated: run `make migrate` first")
    return engine


def check_redis(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CommandError(
            f"cannot reach Redis at {settings.redis_url}: {_first_line(exc)}"
            " (the workers take their work from it)"
        ) from exc
    finally:
        client.close()


def workers_answering() -> int:
    """How many Celery workers answer a ping within a second."""
    from tasks.app import app

    try:
        return len(app.control.ping(timeout=1.0) or [])
    except Exception:
        return 0


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return str(datetime.timedelta(seconds=seconds))


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
