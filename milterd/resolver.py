# -*- test-case-name: tests.unit.test_milterd_live -*-
"""TXT lookups for milterd: blocking DNS in a thread pool, bounded in time, cached, shared.

The lookup itself is :func:`mailplugins.dns.txt_records` (injected, so tests pass a dict). Each
name is looked up at most once at a time (concurrent messages signed by the same domain share
one query), answers (records, or None for "no such record") are reused for ``ttl`` seconds,
and the cache holds at most ``size`` names (oldest first out). A lookup that fails or takes
longer than ``timeout`` is a temporary error for this message, never cached, and never blocks
the reactor: the pool thread may go on waiting, the message does not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, gatherResults, succeed
from twisted.python.failure import Failure

from mailplugins.threads import RunInPool
from mailplugins.ttlcache import TTLCache

TxtAnswer = list[bytes] | None
#: What a caller gets per name: the records, None (no record), or the exception (temperror).
Result = list[bytes] | None | Exception



class DnsTimeout(Exception):
    """The lookup did not answer within milterd.dns_timeout."""


class NotCached(Exception):
    """:meth:`CachedLookup.cached` has no answer for this name yet: do the work in the pool."""


class TxtResolver:
    def __init__(
        self,
        run: RunInPool,
        lookup: Callable[[str], TxtAnswer],
        clock: Any,
        *,
        timeout: float,
        ttl: float,
        size: int,
    ) -> None:
        self._run = run
        self._lookup = lookup
        self._clock = clock
        self.timeout = timeout
        self._cache: TTLCache[str, TxtAnswer] = TTLCache(size, ttl, clock.seconds)
        self._inflight: dict[str, list[Deferred[Result]]] = {}
        #: Lookups that reached DNS (cache misses); for tests and metrics.
        self.queries = 0

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def txt(self, name: str) -> Deferred[Result]:
        """The answer for ``name``; never fails (errors come back as the exception)."""
        key = _cache_key(name)
        entry = self._cache.entry(key)
        if entry is not None:
            result: Deferred[Result] = Deferred()
            result.callback(entry[1])
            return result
        waiter: Deferred[Result] = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        waiters = self._inflight[key] = [waiter]
        self.queries += 1
        query = self._run(self._lookup, key)
        query.addTimeout(self.timeout, self._clock)

        def done(outcome: object) -> None:
            del self._inflight[key]
            answer: Result
            if isinstance(outcome, Failure):
                error = outcome.value
                if isinstance(error, TimeoutError):
                    error = DnsTimeout(f"{key}: no DNS answer within {self.timeout:g}s")
                answer = error if isinstance(error, Exception) else RuntimeError(str(error))
            else:
                answer = outcome  # type: ignore[assignment]
                self._cache.put(key, answer)  # type: ignore[arg-type]
            for each in waiters:
                if not each.called:
                    each.callback(answer)

        query.addBoth(done)
        return waiter

    def many(self, names: Sequence[str]) -> Deferred[dict[str, Result]]:
        """Answers for several names, looked up in parallel."""
        unique = list(dict.fromkeys(names))
        answers: dict[str, Result] = {}
        for name in unique:  # all cached (the usual case): one Deferred, already fired
            entry = self._cache.entry(_cache_key(name))
            if entry is None:
                break
            answers[name] = entry[1]
        else:
            return succeed(answers)
        gathered = gatherResults([self.txt(name) for name in unique])
        return gathered.addCallback(lambda answers: dict(zip(unique, answers, strict=True)))



class CachedLookup:
    """A blocking TXT lookup with the same bounded TTL cache, safe to call from pool threads.

    For the code that does its DNS from a thread (``milterd.dmarc``'s tree walk): answers are
    shared between messages for ``ttl`` seconds; failures are never cached.
    """

    def __init__(self, lookup: Callable[[str], TxtAnswer], *, ttl: float, size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self._cache: TTLCache[str, TxtAnswer] = TTLCache(size, ttl, clock)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def cached(self, name: str) -> TxtAnswer:
        """The cached answer for ``name``, or :class:`NotCached` (never asks DNS, never blocks):
        for running the code on the reactor when every answer it needs is already here."""
        with self._lock:
            entry = self._cache.entry(_cache_key(name))
        if entry is None:
            raise NotCached(name)
        return entry[1]

    def __call__(self, name: str) -> TxtAnswer:
        key = _cache_key(name)
        with self._lock:  # TTLCache is not thread-safe; several pool threads call this
            entry = self._cache.entry(key)
        if entry is not None:
            return entry[1]
        answer = self._lookup(key)  # raises on failure: not cached
        with self._lock:
            self._cache.put(key, answer)
        return answer


def _cache_key(name: str) -> str:
    """The name as the caches hold it: DNS names compare case-insensitively, with or
    without the root's dot."""
    return name.lower().rstrip(".")
