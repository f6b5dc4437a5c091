"""Log lines for every process (server, worker, beat): plain text, the default, or one
JSON object per line (LOG_FORMAT=json), and no secret in either.

JSON lines carry `time` (UTC, ISO 8601), `level`, `logger`, `message` and `process`
(server, worker or beat), then whatever applies to the record: `user_id`,
`server_name`, `room_id`, `task_id`, `task` and any other field a log call passes as
`extra=` (a fetch outcome's `outcome`, `duration_ms`, `generation`; an access log
line's `method`, `path`, `status_code`, `client`), and `exception` with the traceback.

Secrets are kept out twice. Nothing logs them in the first place: tokens travel in
headers, which nothing logs, and the HTTP access log redacts token-like query
parameters (`?access_token=...`, which Matrix clients and older homeservers send).
Then, as a last line of defence, every formatted line is scrubbed of the configured
secret values (AS_TOKEN, HS_TOKEN, ADMIN_TOKEN, passwords in the database, Redis and
homeserver URLs), of `name=value` pairs whose name looks like a token, secret or
password, of `Bearer` credentials and of Synapse-shaped tokens (`syt_...`), whatever
wrote the line (our code, uvicorn, httpx, Celery, a traceback).

Celery stays out of this module: tasks/app.py adds the current task's id and name with
`add_context`, and tells Celery to leave logging to us.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

from directory.config import Settings

REDACTED = "[redacted]"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LOG_FORMATS = ("text", "json")
# Shorter configured values are not scrubbed: replacing every "abc" would garble the
# lines, and a token that short is no secret anyway.
MIN_SECRET_LENGTH = 6
# What a query parameter or a `name=value` pair is called when its value is a secret.
SECRET_NAME = re.compile(r"token|secret|passw(or)?d|api_?key", re.IGNORECASE)
_SECRET_PAIR = re.compile(
    r"(?<![\w.-])([\w.-]*(?:token|secret|passw(?:or)?d|api_?key)[\w.-]*=)([^\s&;,\"'<>()\[\]]+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(\bbearer\s+)([\w.~+/=-]+)", re.IGNORECASE)
# Synapse's access and refresh tokens (syt_<localpart>_<random>_<checksum>, syr_...).
_SYNAPSE_TOKEN = re.compile(r"\bsy[tr]_[A-Za-z0-9_]{8,}")

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_BARE_RECORD = logging.LogRecord("", logging.INFO, "", 0, "", (), None)
_STANDARD_ATTRIBUTES = frozenset(vars(_BARE_RECORD)) | {"message", "asctime", "taskName"}
# Extras that are not ours to publish: uvicorn's coloured copy of a message, Celery's
# dict of a task's context (its id and name become task_id and task instead).
_SKIPPED_EXTRAS = frozenset({"color_message", "data"})
# Fields shown first, in this order, when a record has them.
CONTEXT_FIELDS = ("user_id", "server_name", "room_id", "task_id", "task")

_context_providers: list[Callable[[logging.LogRecord], Mapping[str, object]]] = []


def add_context(provider: Callable[[logging.LogRecord], Mapping[str, object]]) -> None:
    """Fields `provider` returns (e.g. the current task's id) are added to every record
    that does not set them itself. Providers must be cheap and must not log."""
    if provider not in _context_providers:
        _context_providers.append(provider)


class Redactor:
    """Scrubs secrets from a line: the configured values, token-like `name=value`
    pairs, `Bearer` credentials and Synapse-shaped tokens."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        values = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = sorted(values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "=" in text:
            text = _SECRET_PAIR.sub(rf"\1{REDACTED}", text)
        if "earer" in text:
            text = _BEARER.sub(rf"\1{REDACTED}", text)
        if "sy" in text:
            text = _SYNAPSE_TOKEN.sub(REDACTED, text)
        return text


def settings_secrets(settings: Settings) -> list[str]:
    """Every configured value that must never appear in a log line."""
    secrets = [settings.as_token, settings.hs_token, settings.admin_token]
    for url in (settings.database_url, settings.redis_url, settings.homeserver_url):
        try:
            password = urllib.parse.urlsplit(url).password
        except ValueError:
            continue
        if password:
            secrets += [password, urllib.parse.unquote(password)]
    return secrets


def redact_query(path: str) -> str:
    """`path` with the value of every token-like query parameter replaced
    (`access_token`, also when percent-encoded: `access%5Ftoken`)."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    parts = []
    for part in query.split("&"):
        name, eq, _value = part.partition("=")
        if eq and SECRET_NAME.search(urllib.parse.unquote_plus(name)):
            part = f"{name}={REDACTED}"
        parts.append(part)
    return f"{base}?{'&'.join(parts)}"


class AccessLogFilter(logging.Filter):
    """uvicorn's access log: redacts the query, and gives JSON its parts as fields.

    uvicorn logs `'%s - "%s %s HTTP/%s" %d'` with (client, method, path with query,
    HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:
            client, method, path, version, status = args
            path = redact_query(str(path))
            record.args = (client, method, path, version, status)
            record.client = client
            record.method = method
            record.path = path
            record.status_code = status
        return True


class ContextFilter(logging.Filter):
    """Adds the registered providers' fields to records that lack them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for provider in _context_providers:
            try:
                fields = provider(record)
            except Exception:  # a log line is never worth a crash
                continue
            for key, value in fields.items():
                if value is not None and key not in record.__dict__:
                    setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in values are escaped)."""

    def __init__(self, process: str, redact: Callable[[str], str] = lambda s: s) -> None:
        super().__init__()
        self.process = process
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        redact = self.redact
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "process": self.process,
        }
        extras = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRIBUTES
            and key not in _SKIPPED_EXTRAS
            and not key.startswith("_")
        }
        for key in CONTEXT_FIELDS:
            if key in extras:
                line[key] = extras.pop(key)
        line.update(extras)
        for key, value in line.items():
            if value is not None and SECRET_NAME.search(key):
                line[key] = REDACTED  # extra={"access_token": ...}, say
            elif isinstance(value, str):
                line[key] = redact(value)
            elif not isinstance(value, int | float | bool) and value is not None:
                line[key] = redact(str(value))
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(line, default=str)


class RedactingHandler(logging.StreamHandler):
    """A stream handler whose every formatted line is scrubbed, whatever the formatter."""

    def __init__(self, stream: TextIO, redact: Callable[[str], str]) -> None:
        super().__init__(stream)
        self.redact = redact
        self.addFilter(ContextFilter())

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class _StdoutToLog:
    """sys.stdout for JSON logs: each printed line becomes a record (Celery beat's
    banner, a stray print), so the output stays one JSON object per line."""

    def __init__(self, logger: logging.Logger, original: TextIO) -> None:
        self.logger = logger
        self.original = original
        self._buffer = ""
        self._lock = threading.Lock()
        self._local = threading.local()

    def write(self, text: str) -> int:
        if getattr(self._local, "busy", False):
            # Written while logging a line: no loop through the logger.
            return self.original.write(text)
        with self._lock:
            self._buffer += text
            *lines, self._buffer = self._buffer.split("\n")
        self._local.busy = True
        try:
            for line in lines:
                if line.strip():
                    self.logger.info("%s", line.rstrip())
        finally:
            self._local.busy = False
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.original.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("uncaught").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("uncaught").critical(
        "uncaught exception in thread %s",
        getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


_installed: list[tuple[logging.Logger, logging.Handler]] = []


def configure_logging(settings: Settings, process: str) -> None:
    """Logging for one of our processes (server, worker, beat), replacing any earlier
    setup: INFO and up on stderr, as text or JSON (LOG_FORMAT), secrets scrubbed.

    The server's caller must tell uvicorn not to configure logging itself
    (`log_config=None`): its loggers are set up here."""
    redact = Redactor(settings_secrets(settings))
    json_lines = settings.log_format == "json"
    for logger, handler in _installed:
        logger.removeHandler(handler)
    _installed.clear()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)

    handler = RedactingHandler(sys.stderr, redact)
    handler.setFormatter(JsonFormatter(process, redact) if json_lines else _text_formatter())
    _attach(root, handler)
    root.setLevel(logging.INFO)

    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, AccessLogFilter) for f in access.filters):
        access.addFilter(AccessLogFilter())
    for name in ("uvicorn", "uvicorn.access"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.setLevel(logging.INFO)
        logger.propagate = True
    if process == "server" and not json_lines:
        _uvicorn_text_handlers(redact)

    if json_lines:
        # Python's warnings (Celery's running-as-root one, say) and uncaught
        # exceptions would otherwise be printed as bare text.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
        if not isinstance(sys.stdout, _StdoutToLog):
            sys.stdout = _StdoutToLog(logging.getLogger("stdout"), sys.stdout)


def is_configured() -> bool:
    return bool(_installed)


def _text_formatter() -> logging.Formatter:
    return logging.Formatter(TEXT_FORMAT)


def _uvicorn_text_handlers(redact: Callable[[str], str]) -> None:
    """uvicorn's own look in text mode, as its default configuration has it: its
    messages on stderr, the access log on stdout."""
    from uvicorn.logging import AccessFormatter, DefaultFormatter

    default = RedactingHandler(sys.stderr, redact)
    default.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=None))
    access = RedactingHandler(sys.stdout, redact)
    access.setFormatter(
        AccessFormatter(
            '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
            use_colors=None,
        )
    )
    for name, handler in (("uvicorn", default), ("uvicorn.access", access)):
        logger = logging.getLogger(name)
        _attach(logger, handler)
        logger.propagate = False


def _attach(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.addHandler(handler)
    _installed.append((logger, handler))
