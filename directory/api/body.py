"""Reading a JSON object body with a size cap, the Matrix way."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from directory import jsoncodec
from directory.api.errors import MatrixError


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
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
    try:
        body = jsoncodec.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MatrixError(400, "M_NOT_JSON", "body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise MatrixError(400, "M_BAD_JSON", "body must be a JSON object")
    return body


def bearer_token(request: Request) -> str | None:
    """The access token from `Authorization: Bearer` or the legacy `?access_token=`."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query_params.get("access_token") or None
