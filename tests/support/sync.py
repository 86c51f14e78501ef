"""Deferred helpers for unit tests that run pool work on the test's own thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Engine
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed

from mailplugins.config import DatabaseConfig
from mailplugins.db import schema
from mailplugins.db.engine import make_engine


def sync_run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    """A stand-in for a WorkerPool's run: the call happens at once, on this thread."""
    return maybeDeferred(fn, *args, **kwargs)


class SyncPool:
    """A stand-in for a WorkerPool: ``run`` calls at once on this thread and, as the real pool
    does, reports an exception through the Deferred (a failed Deferred), never by raising.
    A BaseException that is no Exception (a test's simulated SIGKILL) goes straight through."""

    name = "sync"
    size = 1
    queued = 0

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            result = fn(*args, **kwargs)
        except Exception:
            return fail()
        return succeed(result)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def result_of(d: Deferred[Any]) -> Any:
    """What ``d`` fired with (a Failure if it failed); it must have fired already."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred did not fire"
    return results[0]


def migrated_engine(url: str, pool_size: int) -> Iterator[Engine]:
    """For a fixture to ``yield from``: an engine on ``url`` with the schema, disposed after."""
    engine = make_engine(DatabaseConfig(url, pool_size=pool_size, timeout=5))
    schema.upgrade(engine)
    yield engine
    engine.dispose()
