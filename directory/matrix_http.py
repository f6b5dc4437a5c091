"""Reading the parts of a Matrix HTTP answer that decide what to do next: the error
code of an error body, and how long a 429 asks us to wait."""

from __future__ import annotations

import json
import math
import time
from email.utils import parsedate_to_datetime

# 429 without a usable hint: long enough to matter, short enough not to stall a server.
DEFAULT_RETRY_AFTER_SECONDS = 5.0
# A server may not park us for longer than this with one header.
MAX_RETRY_AFTER_SECONDS = 3600.0


def _json_object(body: bytes) -> dict | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def matrix_errcode(body: bytes) -> str | None:
    """The `errcode` of a Matrix error body, or None when the body is not one."""
    data = _json_object(body)
    if data is not None and isinstance(data.get("errcode"), str):
        return data["errcode"][:64]
    return None


def retry_after_seconds(header: str | None, body: bytes) -> float:
    """Seconds to wait after a 429: Retry-After (seconds or HTTP date), else the body's
    retry_after_ms, else a default; never negative, never beyond the cap."""
    seconds: float | None = None
    if header is not None:
        header = header.strip()
        try:
            seconds = float(header)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(header).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                seconds = None
    if seconds is None:
        data = _json_object(body)
        ms = data.get("retry_after_ms") if data is not None else None
        if isinstance(ms, int | float) and not isinstance(ms, bool):
            seconds = ms / 1000.0
    if seconds is None or not math.isfinite(seconds):
        return DEFAULT_RETRY_AFTER_SECONDS
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
