# -*- test-case-name: tests.unit.test_policyd_service -*-
"""Database lookups for the rules, cached in memory with a short TTL.

Every lookup runs the synchronous :class:`~mailplugins.store.Store` method through ``run``
(the daemon passes ``Database.run``, a dedicated thread pool; tests pass a synchronous runner).
A cache hit returns an already-fired Deferred and never touches the database, so a decision on
cached facts completes without leaving the reactor thread. Concurrent misses for the same key
share one query. Negative answers (unknown recipient, foreign domain) are cached as well: they
are what a dictionary attack asks for. The cache is bounded (oldest entries go first) and is
dropped whole on reload.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from mailplugins.addresses import Address
from mailplugins.records import MailboxRecord, Resolution
from mailplugins.store import Store
from mailplugins.threads import RunInPool
from mailplugins.ttlcache import TTLCache

T = TypeVar("T")



class LookupOverloadError(Exception):
    """Too much database work is already queued: answer the fallback now instead of queueing
    more (during a database outage every new miss would otherwise wait in the pool)."""


class Lookups:
    """The facts the rules need, each an async (Deferred) lookup through the cache."""

    def __init__(
        self,
        store: Store,
        run: RunInPool,
        clock: Callable[[], float],
        *,
        ttl: float,
        size: int = 100_000,
        delimiters: str = "+",
        max_pending: int = 1000,
    ) -> None:
        self._store = store
        self._run = run
        #: Distinct queries waiting for or running in the database pool beyond which a new miss
        #: fails at once (the service answers its fallback) instead of queueing.
        self.max_pending = max_pending
        self.delimiters = delimiters
        self.cache: TTLCache[Hashable, Any] = TTLCache(size, ttl, clock)
        self._inflight: dict[Hashable, list[Deferred[Any]]] = {}
        #: Database queries made (cache misses that reached the store); for tests and metrics.
        self.queries = 0
        self._generation = 0

    @property
    def pending(self) -> int:
        return len(self._inflight)

    def clear(self) -> None:
        self._generation += 1
        self.cache.clear()

    def _cached(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        entry = self.cache.entry(key)
        if entry is not None:
            return succeed(entry[1])
        waiter: Deferred[Any] = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        if len(self._inflight) >= self.max_pending:
            return fail(LookupOverloadError(f"{len(self._inflight)} database lookups pending"))
        waiters = self._inflight[key] = [waiter]
        generation = self._generation

        def done(result: object) -> None:
            del self._inflight[key]
            if not isinstance(result, Failure) and generation == self._generation:
                self.cache.put(key, result)
            for each in waiters:
                # A waiter whose caller gave up (budget exceeded) is already cancelled.
                if not each.called:
                    if isinstance(result, Failure):
                        each.errback(result)
                    else:
                        each.callback(result)

        self.queries += 1
        self._run(fn, *args).addBoth(done)
        return waiter

    def resolve(self, address: Address) -> Deferred[Resolution | None]:
        """What a recipient resolves to; None when its domain is not ours."""
        delimiters = self.delimiters
        key = ("resolve", address.local_key, address.domain, delimiters)
        return self._cached(key, self._store.resolve, address, delimiters)

    def is_local_domain(self, domain: str) -> Deferred[bool]:
        return self._cached(("domain", domain), self._store.is_local_domain, domain)

    def mailbox(self, address: Address) -> Deferred[MailboxRecord | None]:
        key = ("mailbox", address.local_key, address.domain)
        return self._cached(key, self._store.get_mailbox, address)

    def granted_senders(self, mailbox_id: int) -> Deferred[frozenset[str]]:
        return self._cached(("grants", mailbox_id), self._store.granted_senders, mailbox_id)
