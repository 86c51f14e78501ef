# -*- test-case-name: tests.unit.test_ratelimit -*-
"""What SPF, greylisting and rate limits share: their work runs in a pool, bounded and timed.

Each check counts the work it handed to its pool until that work ends (a request that gave up
waiting still holds a thread), refuses to queue more past ``max_pending`` (the caller answers
its fallback at once), and gives each piece of work a timeout on the reactor's clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mailplugins.threads import RunInPool

T = TypeVar("T")


class Clock(Protocol):
    """What the checks need of the reactor (a ``task.Clock`` in tests)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any: ...


class Pending:
    """Work handed to a pool and not finished yet, counted until the work itself ends (a
    request that gave up waiting still holds a thread), so a hung database cannot make the
    pool's queue grow without bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def track(self, fn: Callable[..., T]) -> Callable[..., T]:
        with self._lock:
            self.count += 1

        done = [False]

        def tracked(*args: Any, **kwargs: Any) -> T:
            # Counted down once even when run twice (a group commit runs a batch again
            # when one of its checks failed).
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    if not done[0]:
                        done[0] = True
                        self.count -= 1

        return tracked


class PooledCheck:
    """Base of a check whose blocking work runs through ``run`` (a pool)."""

    def __init__(self, run: RunInPool, clock: Clock, max_pending: int) -> None:
        self._run = run
        self._clock = clock
        self.max_pending = max_pending
        self.pending = Pending()

    @property
    def overloaded(self) -> bool:
        """Too much work is already handed over: answer the fallback instead of queueing."""
        return self.pending.count >= self.max_pending

    def submit(self, timeout: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """``fn(*args, **kwargs)`` in the pool, counted, failing with a timeout after ``timeout``."""
        work = self._run(self.pending.track(fn), *args, **kwargs)
        work.addTimeout(timeout, cast(IReactorTime, self._clock))
        return work


def fallback(action: str) -> str | None:
    """A configured fallback action as the checks return it: DUNNO means no opinion (None)."""
    return None if action.upper() == "DUNNO" else action
