"""Redis locks that speed work up but never decide correctness.

Every lock has an owner token and an expiry, so a crashed holder frees it by itself and
nobody releases a lock they do not own. If Redis forgets a lock (restart, flush), the
worst case is a duplicate profile request, which every job tolerates.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence

import redis

# Compare-and-delete: release only if we still own it.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Compare-and-extend.
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
# A counting semaphore: members are owner tokens scored by their expiry time (ms).
_ACQUIRE_SLOT = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1])
if redis.call('zcard', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('zadd', KEYS[1], ARGV[3], ARGV[4])
  redis.call('pexpire', KEYS[1], ARGV[5])
  return 1
end
return 0
"""
# Compare-and-delete of many keys sharing one owner token: one round trip for a batch.
_RELEASE_MANY = """
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then released = released + redis.call('del', key) end
end
return released
"""
# Compare-and-extend of many keys sharing one owner token.
_EXTEND_MANY = """
local extended = 0
for _, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then
    extended = extended + redis.call('pexpire', key, ARGV[2])
  end
end
return extended
"""
_EXTEND_SLOT = """
if redis.call('zscore', KEYS[1], ARGV[1]) then
  redis.call('zadd', KEYS[1], ARGV[2], ARGV[1])
  redis.call('pexpire', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


class Lock:
    """SET NX PX with an owner token; release and extend only while we own it."""

    def __init__(self, client: redis.Redis, key: str, ttl_ms: int) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def extend(self) -> bool:
        return bool(self.client.eval(_EXTEND, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> bool:
        return bool(self.client.eval(_RELEASE, 1, self.key, self.token))


class LockSet:
    """Locks on many keys under one owner token, taken and released in one round trip
    each: a batch of work locks its items together instead of one by one."""

    def __init__(self, client: redis.Redis, ttl_ms: int) -> None:
        self.client = client
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)
        self.held: set[str] = set()

    def acquire(self, keys: Sequence[str]) -> list[bool]:
        """Try every key; for each, whether we hold it now. Busy keys are not waited for."""
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, self.token, nx=True, px=self.ttl_ms)
            taken = [bool(ok) for ok in pipe.execute()]
        self.held.update(key for key, ok in zip(keys, taken, strict=True) if ok)
        return taken

    def release(self) -> int:
        """Free every key we still own; returns how many were."""
        if not self.held:
            return 0
        keys = sorted(self.held)
        self.held.clear()
        return int(self.client.eval(_RELEASE_MANY, len(keys), *keys, self.token))

    def extend(self) -> int:
        """Renew every key we still own for another ttl; returns how many were."""
        keys = sorted(self.held)
        if not keys:
            return 0
        return int(self.client.eval(_EXTEND_MANY, len(keys), *keys, self.token, self.ttl_ms))


class Semaphore:
    """At most `limit` holders of `key` at once, across every process; each holder's
    place expires after ttl_ms unless extended, so a killed holder frees it."""

    def __init__(self, client: redis.Redis, key: str, limit: int, ttl_ms: int) -> None:
        self.client = client
        self.key = key
        self.limit = limit
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)

    def acquire(self) -> bool:
        now = int(time.time() * 1000)
        return bool(
            self.client.eval(
                _ACQUIRE_SLOT,
                1,
                self.key,
                now,
                self.limit,
                now + self.ttl_ms,
                self.token,
                self.ttl_ms * 2,
            )
        )

    def extend(self) -> bool:
        now = int(time.time() * 1000)
        return bool(
            self.client.eval(
                _EXTEND_SLOT, 1, self.key, self.token, now + self.ttl_ms, self.ttl_ms * 2
            )
        )

    def release(self) -> None:
        self.client.zrem(self.key, self.token)

    def holders(self) -> int:
        now = int(time.time() * 1000)
        return int(self.client.zcount(self.key, now, "+inf"))
