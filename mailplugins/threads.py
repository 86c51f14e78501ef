# -*- test-case-name: tests.unit.test_threads -*-
"""Dedicated worker thread pools, so blocking work never runs on the reactor.

The reactor's own pool is shared with name resolution; database calls, password hashing and disk
writes each get a pool of their own, sized to what they may run in parallel (the database pool to
the engine's connection pool, so a thread never waits for a connection).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool

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
