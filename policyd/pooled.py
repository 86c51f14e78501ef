# -*- test-case-name: tests.unit.test_pooled -*-
"""What SPF, greylisting and rate limits share: their work runs in a pool, bounded and timed.

Each check counts the work it handed to its pool until that work ends (a request that gave up
waiting still holds a thread), refuses to queue more past ``max_pending`` (the caller answers
its fallback at once), and gives each piece of work a timeout on the reactor's clock.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.python.failure import Failure

from mailplugins.threads import RunInPool

T = TypeVar("T")


class Clock(Protocol):
    """What the checks need of the reactor (a ``task.Clock`` in tests)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any: ...


class Deadlines:
    """Timeouts for many Deferreds on one reactor timer.

    ``Deferred.addTimeout`` schedules and cancels a reactor call and makes four closures for
    every Deferred: about a tenth of the reactor's time per request where every request waits
    on the database. Here a timeout is a ``(deadline, number)`` pair in a heap (plain data,
    which the garbage collector soon stops tracking) and the waiting Deferred sits in a dict
    until it fires; one timer is set for the earliest deadline still waiting. A Deferred still
    waiting at its deadline is cancelled: it fails with ``CancelledError``, and a result
    arriving later is ignored. When nothing waits any more the timer is cancelled.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int]] = []
        self._waiting: dict[int, Deferred[Any]] = {}
        self._numbers = itertools.count()
        self._timer: Any = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        """Deferreds still waiting."""
        return len(self._waiting)

    def add(self, work: Deferred[Any], timeout: float) -> None:
        """Cancel ``work`` if it has not fired ``timeout`` seconds from now."""
        now = self._clock.seconds()
        deadline = now + timeout
        number = next(self._numbers)
        self._waiting[number] = work
        heapq.heappush(self._heap, (deadline, number))
        if self._timer is None:
            self._schedule(now)
        elif deadline < self._timer_at:
            self._timer.cancel()
            self._schedule(now)
        work.addBoth(self._fired, number)  # last: work that has fired runs it at once

    def _fired(self, result: T, number: int) -> T:
        waiting = self._waiting
        waiting.pop(number, None)
        if not waiting and self._timer is not None:
            # Nothing waits: no timer left behind (an idle daemon has none pending).
            self._timer.cancel()
            self._timer = None
            self._heap.clear()
        return result

    def _schedule(self, now: float) -> None:
        self._timer_at = self._heap[0][0]
        self._timer = self._clock.callLater(max(0.0, self._timer_at - now), self._expire)

    def _expire(self) -> None:
        self._timer = None
        heap, waiting = self._heap, self._waiting
        now = self._clock.seconds()
        while heap:
            deadline, number = heap[0]
            work = waiting.get(number)
            if work is not None and deadline > now:
                break
            heapq.heappop(heap)
            if work is not None:
                del waiting[number]
                work.cancel()
        if heap:
            self._schedule(now)


class Pending:
    """Work handed to a pool and not finished yet, counted until the work itself ends (a
    request that gave up waiting still holds a thread), so a hung database cannot make the
    pool's queue grow without bound."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def track(self, fn: Callable[..., T]) -> Tracked[T]:
        with self._lock:
            self.count += 1
        return Tracked(fn, self)

    def _release(self) -> None:
        with self._lock:
            self.count -= 1


class Tracked(Generic[T]):
    """``fn`` counted in its :class:`Pending` until it has run, or until :meth:`release` (a
    batch that decides many checks in one go, without calling each, releases them itself).
    ``fn`` is the check's function, which a batching runner looks at to pick its path."""

    __slots__ = ("_done", "_pending", "fn")

    def __init__(self, fn: Callable[..., T], pending: Pending) -> None:
        self.fn = fn
        self._pending = pending
        self._done = False

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.release()

    def release(self) -> None:
        """Count down once, even when run twice (a group commit runs a batch again when one
        of its checks failed)."""
        if not self._done:
            self._done = True
            self._pending._release()


class PooledCheck:
    """Base of a check whose blocking work runs through ``run`` (a pool)."""

    def __init__(self, run: RunInPool, clock: Clock, max_pending: int) -> None:
        self._run = run
        self._clock = clock
        self.max_pending = max_pending
        self.pending = Pending()
        self.deadlines = Deadlines(clock)

    @property
    def overloaded(self) -> bool:
        """Too much work is already handed over: answer the fallback instead of queueing."""
        return self.pending.count >= self.max_pending

    def submit(self, timeout: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """``fn(*args, **kwargs)`` in the pool, counted, failing with ``TimeoutError`` if it
        has not ended ``timeout`` seconds from now."""
        work = self._run(self.pending.track(fn), *args, **kwargs)
        self.deadlines.add(work, timeout)
        return work.addErrback(_timed_out)


def _timed_out(failure: Failure) -> Failure:
    """A check's work cancelled at its deadline fails as a timeout (what the logs say)."""
    failure.trap(CancelledError)
    raise TimeoutError("no result within the check's timeout")


def fallback(action: str) -> str | None:
    """A configured fallback action as the checks return it: DUNNO means no opinion (None)."""
    return None if action.upper() == "DUNNO" else action
