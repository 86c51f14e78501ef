# -*- test-case-name: tests.unit.test_ttlcache -*-
"""One bounded cache whose entries expire, for every daemon's in-memory memo.

Lookups, remembered decisions, success caches and DNS answers all want the same thing: at most
``size`` entries, each valid until a deadline (``ttl`` after it was stored, or an explicit
``expires``), the entry stored longest ago dropped first when full, an expired entry dropped
when met. Reading does not refresh an entry: a hot key still expires and is fetched again, so
what the database or DNS says reaches every process within ``ttl``.

Time is injected: a ``clock`` (``reactor.seconds``) or ``now`` passed to each call, so the cache
is plain data for tests. Runs on the reactor thread only (no locking).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """At most ``size`` entries, each until its deadline; oldest stored goes first."""

    def __init__(self, size: int, ttl: float = 0.0, clock: Callable[[], float] | None = None) -> None:
        self.size = size
        #: Seconds an entry stored without an explicit ``expires`` stays valid (0: not stored).
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def _now(self, now: float | None) -> float:
        if now is not None:
            return now
        if self._clock is None:
            raise TypeError("TTLCache without a clock needs now=")
        return self._clock()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))

    def entry(self, key: K, now: float | None = None) -> tuple[float, V] | None:
        """``(expires, value)`` while the entry is valid, else None (an expired one is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._now(now):
            del self._entries[key]
            return None
        return entry

    def get(self, key: K, now: float | None = None) -> V | None:
        """The valid value, or None (use :meth:`entry` where None is a value)."""
        entry = self.entry(key, now)
        return None if entry is None else entry[1]

    def put(self, key: K, value: V, now: float | None = None, *, expires: float | None = None) -> None:
        """Store ``value`` until ``expires`` (default: ``ttl`` from now); drop the oldest when full."""
        if expires is None:
            if self.ttl <= 0:
                return
            expires = self._now(now) + self.ttl
        if self.size <= 0:
            return
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (expires, value)
        while len(entries) > self.size:
            entries.popitem(last=False)

    def replace(self, key: K, value: V) -> None:
        """A new value for a stored entry, keeping its deadline and place; nothing if absent."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], value)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
