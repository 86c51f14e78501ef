# -*- test-case-name: tests.unit.test_shared_writes -*-
"""The shared failure counters' writes, on a path of their own so logins never wait for them.

With ``penalty_shared`` every failed login is a database write (one upsert per key), and a
brute-force attack makes hundreds a second. Sent through the database pool they queued in front
of the mailbox lookups of real logins and, on SQLite, held them past ``database.timeout``: the
login became a temporary failure. So these writes never enter the database pool:

- they run on one thread of their own (``run``, a one-thread pool) with their own connection, so
  at most one batch is in flight and the lookups' pool and connections never see them;
- while a batch is being written, new writes wait in a bounded backlog; the next batch takes the
  whole backlog in one transaction (an attack costs a transaction per batch, not per failure);
- past ``limit`` waiting writes, new ones are dropped and counted
  (``_shared_writes_total{result="dropped"}``): the local counters still see every failure, and
  the shared count, which only needs to cross ``penalty_threshold``, loses nothing that matters.

A failed batch is logged (the error's type) and counted; the next one goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter
from sqlalchemy import Engine
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from authd import failures
from authd.failures import ClearLogin, RecordFailure, SharedWrite
from mailplugins.database import Database
from mailplugins.db.engine import make_engine
from mailplugins.metrics import LabelCache
from mailplugins.threads import WorkerPool

log = Logger()

#: Writes waiting for the writer at most; more are dropped (and counted).
BACKLOG_LIMIT = 1000


class SharedWrites:
    """Queue shared-counter writes and apply them in batches, one batch in flight at a time."""

    def __init__(
        self,
        run: Callable[..., Deferred[Any]],
        engine: Engine,
        written: LabelCache[Counter],
        limit: int = BACKLOG_LIMIT,
        pool: WorkerPool | None = None,
    ) -> None:
        self._run = run
        #: The writer's own one-thread pool, when it has one (the daemon's does).
        self.pool = pool
        self.engine = engine
        self._counter = written
        self.limit = limit
        self._backlog: list[SharedWrite] = []
        self._in_flight: Deferred[Any] | None = None

    @property
    def waiting(self) -> int:
        """Writes in the backlog (not counting the batch being written)."""
        return len(self._backlog)

    @property
    def busy(self) -> bool:
        return self._in_flight is not None

    def record(self, keys: list[str], fingerprint: str, now: int, window: int) -> None:
        self._add(RecordFailure(tuple(keys), fingerprint, now, window))

    def clear(self, key: str) -> None:
        self._add(ClearLogin(key))

    def _add(self, write: SharedWrite) -> None:
        if len(self._backlog) >= self.limit:
            self._counter["dropped"].inc()
            return
        self._backlog.append(write)
        if self._in_flight is None:
            self._flush()

    def _flush(self) -> None:
        batch, self._backlog = self._backlog, []
        work = self._run(failures.write_batch, self.engine, batch)
        self._in_flight = work

        def written(_: object) -> None:
            self._counter["written"].inc(len(batch))

        def failed(failure: Failure) -> None:
            self._counter["failed"].inc(len(batch))
            log.warn("shared failure counter writes failed ({count}): {error}", count=len(batch),
                     error=failure.type.__name__ if failure.type else "error")

        def next_batch(_: object) -> None:
            self._in_flight = None
            if self._backlog:
                self._flush()

        work.addCallbacks(written, failed)
        work.addBoth(next_batch)


def shared_writes_for(
    reactor: Any, database: Database, written: LabelCache[Counter]
) -> SharedWrites:
    """The daemon's writer: one thread, and one connection of its own. An in-memory SQLite
    database (tests only) is one connection that one thread at a time may use: there the writer
    batches through the database pool."""
    config = database.config
    if config.is_sqlite and (":memory:" in config.url or config.url == "sqlite://"):
        return SharedWrites(database.run, database.engine, written)
    engine = make_engine(dataclasses.replace(config, pool_size=1))
    pool = WorkerPool(reactor, "authd-shared-writes", 1)
    return SharedWrites(pool.run, engine, written, pool=pool)
