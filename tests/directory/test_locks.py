"""Redis locks and the per-destination semaphore: owners only, and self-expiring, so
a crashed holder never blocks work for longer than its TTL."""

from __future__ import annotations

import time

import redis

from directory.locks import Lock, LockSet, Semaphore


def test_a_lock_has_one_owner_and_only_the_owner_releases_it(
    redis_client: redis.Redis,
) -> None:
    first = Lock(redis_client, "ud:test", 5_000)
    second = Lock(redis_client, "ud:test", 5_000)
    assert first.acquire()
    assert not second.acquire()
    assert not second.release() and not second.extend()
    assert first.extend()
    assert first.release()
    assert second.acquire()


def test_a_lock_expires_if_its_holder_dies(redis_client: redis.Redis) -> None:
    assert Lock(redis_client, "ud:test", 200).acquire()
    time.sleep(0.3)
    assert Lock(redis_client, "ud:test", 200).acquire()


def test_the_semaphore_admits_at_most_limit_holders(redis_client: redis.Redis) -> None:
    holders = [Semaphore(redis_client, "ud:slots", 3, 5_000) for _ in range(5)]
    admitted = [h.acquire() for h in holders]
    assert admitted == [True, True, True, False, False]
    holders[0].release()
    assert holders[3].acquire()
    assert holders[0].holders() == 3


def test_a_dead_holders_slot_frees_itself(redis_client: redis.Redis) -> None:
    dead = Semaphore(redis_client, "ud:slots", 1, 200)
    alive = Semaphore(redis_client, "ud:slots", 1, 200)
    assert dead.acquire()
    assert not alive.acquire()
    time.sleep(0.3)
    assert alive.acquire()
    assert not dead.extend()  # its place is gone; it cannot take it back


def test_a_lock_set_takes_free_keys_at_once_and_releases_only_its_own(
    redis_client: redis.Redis,
) -> None:
    assert Lock(redis_client, "ud:b", 5_000).acquire()
    batch = LockSet(redis_client, 5_000)
    assert batch.acquire(["ud:a", "ud:b", "ud:c"]) == [True, False, True]
    assert not LockSet(redis_client, 5_000).acquire(["ud:a"])[0]
    assert batch.release() == 2
    assert redis_client.exists("ud:a", "ud:c") == 0
    assert redis_client.exists("ud:b") == 1  # someone else's
