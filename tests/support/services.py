"""Real backing services for the tests: a throwaway database and a private Redis.

The database is PostgreSQL unless DIRECTORY_TEST_DB=sqlite; either way its schema
comes from the Alembic migrations, as in production. Redis is a redis-server of our
own on a free port, so tests may flush or kill it without touching the shared one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from directory.config import PROJECT_ROOT

PG_ADMIN_URL = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def selected_backend() -> str:
    backend = os.environ.get("DIRECTORY_TEST_DB", "postgresql")
    if backend not in ("postgresql", "sqlite"):
        raise RuntimeError(f"DIRECTORY_TEST_DB must be postgresql or sqlite, not {backend}")
    return backend


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def migrate(url: str) -> None:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


class ThrowawayDatabase:
    """A database created for one test session and dropped after it."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend = backend
        if backend == "sqlite":
            self.url = f"sqlite:///{workdir / 'directory-test.sqlite3'}"
            self._name = None
        else:
            self._name = f"dirtest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            base = PG_ADMIN_URL.rsplit("/", 1)[0]
            self.url = f"{base}/{self._name}"

    def create(self) -> None:
        if self._name:
            admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{self._name}"'))
            admin.dispose()
        migrate(self.url)

    def drop(self) -> None:
        if not self._name:
            return
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self._name}" WITH (FORCE)'))
        admin.dispose()


class PrivateRedis:
    """A redis-server process of our own, which tests may flush, kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/ensure-redis installs it)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Out of the caller's process group: a Ctrl-C there is the caller's to handle.
            start_new_session=True,
        )
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10)

    def flush(self) -> None:
        # Only ever our own server: locks and semaphores left by killed workers go too.
        client = self.client()
        client.flushall()
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
