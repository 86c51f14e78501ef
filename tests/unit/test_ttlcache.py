"""mailplugins.ttlcache: bounded, expiring, oldest stored first, time injected."""

from __future__ import annotations

import pytest

from mailplugins.ttlcache import TTLCache


def test_bounded_and_expires_with_a_clock() -> None:
    now = [0.0]
    cache: TTLCache[str, int | None] = TTLCache(2, ttl=10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", None)
    assert cache.entry("b") == (10.0, None)  # None is a value: entry() tells it from a miss
    cache.put("c", 3)
    assert cache.entry("a") is None and len(cache) == 2
    now[0] = 10.0
    assert cache.get("c") is None and len(cache) == 1  # met expired: dropped


def test_reading_does_not_refresh_but_storing_again_does() -> None:
    cache: TTLCache[str, int] = TTLCache(2, ttl=5)
    cache.put("a", 1, now=0)
    cache.put("b", 2, now=0)
    assert cache.get("a", now=1) == 1
    cache.put("c", 3, now=1)  # "a" was stored first: it goes, however often it was read
    assert cache.get("a", now=1) is None and cache.get("b", now=1) == 2
    cache.put("b", 4, now=1)
    cache.put("d", 5, now=1)
    assert list(cache) == ["b", "d"]


def test_explicit_deadline_replace_discard_and_clear() -> None:
    cache: TTLCache[str, str] = TTLCache(10)  # no ttl: only explicit deadlines are stored
    cache.put("plain", "x", now=0)
    assert len(cache) == 0
    cache.put("k", "greylisted", expires=100)
    assert cache.entry("k", now=50) == (100, "greylisted")
    cache.replace("k", "passed")
    cache.replace("absent", "y")
    assert cache.entry("k", now=99) == (100, "passed") and "absent" not in list(cache)
    cache.discard("k")
    assert cache.get("k", now=0) is None
    cache.put("k", "again", expires=1)
    cache.clear()
    assert len(cache) == 0


def test_size_zero_stores_nothing_and_time_is_required() -> None:
    cache: TTLCache[str, int] = TTLCache(0, ttl=10)
    cache.put("a", 1, now=0)
    assert len(cache) == 0
    with pytest.raises(TypeError):
        TTLCache[str, int](1, ttl=1).put("a", 1)
