"""WorkerPool: blocking work off the reactor, its backlog, its errors as Failures."""

from __future__ import annotations

import threading
from typing import Any

from twisted.python.failure import Failure

from mailplugins.threads import WorkerPool


class DirectReactor:
    """Delivers results straight from the worker thread: enough to test the pool alone."""

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str]] = []

    def callFromThread(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        fn(*args, **kwargs)

    def addSystemEventTrigger(self, phase: str, event: str, fn: Any) -> None:
        self.triggers.append((phase, event))


def wait_for(d: Any) -> Any:
    done = threading.Event()
    box: list[Any] = []
    def arrived(result: Any) -> None:
        box.append(result)
        done.set()

    d.addBoth(arrived)
    assert done.wait(10)
    return box[0]


def test_worker_pool_runs_off_the_calling_thread() -> None:
    reactor = DirectReactor()
    pool = WorkerPool(reactor, "test", 2)
    try:
        value, thread = wait_for(pool.run(lambda x: (x * 2, threading.get_ident()), 21))
        assert value == 42
        assert thread != threading.get_ident()
        assert reactor.triggers == [("during", "shutdown")]
    finally:
        pool.stop()


def test_worker_pool_reports_its_backlog() -> None:
    pool = WorkerPool(DirectReactor(), "test", 1)
    gate = threading.Event()
    try:
        first = pool.run(gate.wait, 10)
        second = pool.run(lambda: "done")
        assert pool.queued >= 1
        gate.set()
        assert wait_for(second) == "done"
        assert wait_for(first) is True
        assert pool.queued == 0
    finally:
        gate.set()
        pool.stop()


def test_worker_pool_errors_arrive_as_failures() -> None:
    pool = WorkerPool(DirectReactor(), "test", 1)
    try:
        result = wait_for(pool.run(lambda: 1 / 0))
        assert isinstance(result, Failure)
        assert result.check(ZeroDivisionError)
    finally:
        pool.stop()


def test_the_sync_fake_fails_as_the_pool_does() -> None:
    """Unit tests' SyncPool reports an exception through the Deferred, like WorkerPool.run."""
    from tests.support.sync import SyncPool, result_of

    def boom() -> None:
        raise KeyError("x")

    failure = result_of(SyncPool().run(boom))
    assert isinstance(failure, Failure) and failure.check(KeyError)
    pool = WorkerPool(DirectReactor(), "test", 1)
    try:
        real = wait_for(pool.run(boom))
        assert isinstance(real, Failure) and real.check(KeyError)
    finally:
        pool.stop()
