# -*- test-case-name: tests.unit.test_runner -*-
"""The database as the daemons use it: engine, store and a dedicated thread pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred

from mailplugins.config import DatabaseConfig
from mailplugins.db.engine import make_engine
from mailplugins.store import Store
from mailplugins.threads import WorkerPool

P = ParamSpec("P")
R = TypeVar("R")


class Database:
    """Blocking store calls run in a pool sized to the engine's connection pool."""

    def __init__(self, reactor: Any, config: DatabaseConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or Store(make_engine(config))
        self.engine = self.store.engine
        in_memory = config.is_sqlite and (":memory:" in config.url or config.url == "sqlite://")
        # An in-memory SQLite database is one shared connection: one thread at a time.
        size = 1 if in_memory else config.pool_size
        self.pool = WorkerPool(reactor, "db", size)

    @property
    def timeout(self) -> float:
        return self.config.timeout

    def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
        return self.pool.run(fn, *args, **kwargs)

    def close(self) -> None:
        self.pool.stop()
        self.engine.dispose()
