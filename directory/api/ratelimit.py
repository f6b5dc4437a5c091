"""Token buckets in Redis, shared by every server process: one per searching user, and
one per client address for requests not yet authenticated (directory/api/auth.py).

If Redis is unreachable the request is allowed: rate limiting protects the database,
and refusing every search because Redis blinked would be worse.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

# Returns {allowed (0/1), milliseconds until one token is available}.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('hmget', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) / 1000 * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('hset', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('pexpire', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, wait}
"""

# Returns one token taken by _TAKE (the bucket never exceeds its burst).
_GIVE_BACK = """
local burst = tonumber(ARGV[1])
local tokens = tonumber(redis.call('hget', KEYS[1], 'tokens'))
if tokens then
  redis.call('hset', KEYS[1], 'tokens', math.min(burst, tokens + 1))
end
return 0
"""


class RateLimiter:
    def __init__(self, client: aioredis.Redis, rate_per_second: float, burst: int) -> None:
        self.client = client
        self.rate = rate_per_second
        self.burst = burst

    async def take(self, key: str) -> float | None:
        """None if allowed; else seconds to wait."""
        try:
            allowed, wait_ms = await self.client.eval(
                _TAKE, 1, f"ud:rl:{key}", self.rate, self.burst, int(time.time() * 1000)
            )
        except RedisError:
            logger.warning("rate limiter: Redis unreachable, allowing", exc_info=True)
            return None
        return None if allowed else max(int(wait_ms), 1) / 1000

    async def give_back(self, key: str) -> None:
        """Return the token a `take` of `key` took (the request turned out to be one
        this bucket is not meant to limit)."""
        try:
            await self.client.eval(_GIVE_BACK, 1, f"ud:rl:{key}", self.burst)
        except RedisError:
            logger.warning("rate limiter: Redis unreachable, token not given back")
