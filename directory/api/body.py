"""Reading a JSON object body with a size cap, and the caller's access token, the
Matrix way. No body, however hostile, raises anything but a MatrixError."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.requests import Request

from directory import jsoncodec
from directory.api.errors import MatrixError


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_loads(data: bytes) -> Any:
    """JSON as the spec has it: NaN, Infinity and -Infinity are refused, as Synapse's
    parse_json_object_from_request does (a number too large for a double, 1e309,
    still parses, as infinity: the caller's checks refuse it)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson is stricter than the standard library on lone surrogates and
        # integers beyond 64 bits, which are valid JSON.
        return json.loads(data, parse_constant=_reject_constant)


async def read_json_object(
    request: Request, max_bytes: int, *, strict: bool = False
) -> dict[str, Any]:
    """The body as a JSON object: 413 M_TOO_LARGE past `max_bytes`, 400 M_NOT_JSON
    for anything that is not JSON (invalid UTF-8, nesting too deep to parse, with
    `strict` NaN and Infinity), 400 M_BAD_JSON for JSON that is not an object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise MatrixError(413, "M_TOO_LARGE", f"body larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise MatrixError(413, "M_TOO_LARGE", f"body larger than {max_bytes} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    try:
        body = _strict_loads(data) if strict else jsoncodec.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: a body nested ~1,000 levels deep defeats the stdlib parser.
        raise MatrixError(400, "M_NOT_JSON", "body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise MatrixError(400, "M_BAD_JSON", "body must be a JSON object")
    return body


def bearer_token(request: Request) -> str | None:
    """The access token from `Authorization: Bearer` or the legacy `?access_token=`,
    as sent: whether it could be a token at all is the verifier's question."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query_params.get("access_token") or None
