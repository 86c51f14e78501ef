# -*- test-case-name: tests.unit.test_threads -*-
"""Dedicated worker thread pools, so blocking work never runs on the reactor.

The reactor's own pool is shared with name resolution; database calls, password hashing and disk
writes each get a pool of their own, sized to what they may run in parallel (the database pool to
the engine's connection pool, so a thread never waits for a connection).
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

log = Logger(namespace="mailplugins.threads")

P = ParamSpec("P")
R = TypeVar("R")

#: "Run this in that pool": ``run(fn, *args)`` calls the blocking ``fn`` off the reactor and
#: fires the Deferred on the reactor thread. :meth:`WorkerPool.run` and ``Database.run`` are
#: ones; decision objects take one injected so tests can pass a synchronous fake.
RunInPool = Callable[..., Deferred[Any]]


class WorkerPool:
    """A named ThreadPool started with the reactor and stopped before it exits."""

    def __init__(self, reactor: Any, name: str, size: int) -> None:
        self._reactor = reactor
        self.name = name
        self.size = size
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=f"mailplugins-{name}")
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._pool.start()
            self._started = True
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._pool.stop()

    @property
    def queued(self) -> int:
        """Work items waiting for a thread (a saturation signal for metrics).

        ``ThreadPool.q`` is the public name of the backlog (``qsize()``; Twisted 26 keeps it
        for compatibility over its worker team); ``test_worker_pool_reports_its_backlog`` pins it.
        """
        return int(self._pool.q.qsize())

    def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
        """Run ``fn`` in the pool; the Deferred fires on the reactor thread."""
        self.start()
        reactor: IReactorFromThreads = self._reactor
        return threads.deferToThreadPool(reactor, self._pool, fn, *args, **kwargs)


class QueuePool:
    """A fixed team of threads fed by one ``queue.SimpleQueue``: WorkerPool's interface with
    the cheapest hand-off CPython has (one C-level queue, no Python locks or conditions).

    Twisted's ThreadPool passes each call through a coordinator and a queue per worker, built
    from Python locks and conditions; when the reactor thread is busy, every contended one is a
    GIL hand-off (a futex wake, a wait, two context switches). A trivial call's round trip costs
    about 45 us of CPU through it and about 20 us here. deliver's disk pool makes one call per
    message, so it uses this one. The threads start with the first call (never in a process
    that forks workers later) and stop after the work already queued.
    """

    def __init__(self, reactor: Any, name: str, size: int) -> None:
        self._reactor = reactor
        self.name = name
        self.size = size
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self._threads:
            return
        for number in range(self.size):
            thread = threading.Thread(target=self._work, name=f"mailplugins-{self.name}-{number}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        """Let the threads finish what is queued, then end them (blocking, as ThreadPool.stop)."""
        threads_, self._threads = self._threads, []
        for _thread in threads_:
            self._queue.put(None)
        for thread in threads_:
            thread.join()

    @property
    def queued(self) -> int:
        """Calls waiting for a thread (a saturation signal for metrics)."""
        return self._queue.qsize()

    def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
        """Run ``fn`` in the pool; the Deferred fires on the reactor thread."""
        self.start()
        d: Deferred[R] = Deferred()
        self._queue.put(_Job(d, functools.partial(fn, *args, **kwargs)))
        return d

    def _work(self) -> None:
        get = self._queue.get
        while True:
            job = get()
            if job is None:
                return
            outcome: tuple[Callable[[Any], object], object]
            try:
                outcome = (job.deferred.callback, job.call())
            except BaseException:
                outcome = (job.deferred.errback, Failure())
            try:
                self._reactor.callFromThread(*outcome)
            except Exception:
                # As ThreadPool does: logged, and the thread keeps serving.
                log.failure("cannot hand a result back to the reactor")
            del job, outcome  # not kept alive while this thread waits for the next one


@dataclass(slots=True)
class _Job:
    deferred: Deferred[Any]
    call: Callable[[], Any]
