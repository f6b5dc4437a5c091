"""JSON in and out on the hot ingest path: orjson where it can, the standard library
where orjson is stricter than the JSON a homeserver may send (lone surrogates in
strings, integers beyond 64 bits), so nothing the stdlib accepts is refused."""

from __future__ import annotations

import json
import zlib
from typing import Any

import orjson

# Fastest zlib level: accepted transactions are stored compressed (a 100-event
# transaction is ~30 KB of repetitive JSON, ~5 KB compressed, small enough to stay in
# the table row instead of PostgreSQL's out-of-line TOAST storage).
COMPRESSION_LEVEL = 1


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


def pack(value: Any) -> bytes:
    return zlib.compress(dumps(value), COMPRESSION_LEVEL)


def unpack(data: bytes) -> Any:
    return loads(zlib.decompress(data))
