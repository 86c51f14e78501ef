# -*- test-case-name: tests.unit.test_policy_batch -*-
"""Group commit for greylisting and rate limits on SQLite.

SQLite has one writer per database. With a transaction per check, every greylisting or
rate-limit decision paid for a pool checkout, ``BEGIN``, a WAL commit, a hand-off to a database
thread and back, and waited for the single writer lock besides; under load the checks queued
behind one another at that lock, one commit each. Here the checks that arrive while a batch is
running wait on the reactor instead and then run together: one database thread, one
connection, one transaction and one commit for all of them, and one wake-up of the reactor
with all their results.

Each check keeps its own semantics: a check that fails is rolled back alone and fails alone
(the batch is then run again with each check inside a ``SAVEPOINT``), its statements see the
checks before it in the same transaction, and nothing is answered before the commit succeeded
(a failed commit fails every check of the batch, and each answers its fallback). Counting stays
atomic: SQLite's write lock is taken before the batch's first write
(:func:`policyd.sql.transactions.write_lock`) and held to its commit. Only the greylisting
checks' first read comes before it (:func:`_read_ahead`): their writes are compare-and-set,
so a row another worker changed in between is decided again under the lock.

Only SQLite batches (see :func:`batching_runner`). PostgreSQL and MariaDB run many writers at
once, and a batch would hold the row locks of every subject in it until its commit, making
other hosts wait on subjects they do not share; there each check stays one short transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import Any

from sqlalchemy import Connection, Engine
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplugins.threads import RunInPool
from policyd.sql.greylist import (
    Lookup,
    Sighting,
    StaleConnection,
    greylist_check,
    greylist_many,
    lookup_many,
)
from policyd.sql.transactions import one_writer, write_lock

_log = Logger()

#: Most checks in one transaction: bounds how long the write lock is held.
MAX_BATCH = 200

#: SQLite: batches of one process between two checkpoints of the write-ahead log, which run
#: outside the write lock (:func:`checkpoint`).
CHECKPOINT_EVERY = 32

#: SQLite: the write-ahead log's pages past which a commit checkpoints by itself, inside the
#: write lock (SQLite's default is 1000). Only a backstop here, for when the checkpoints
#: outside the lock fall behind.
AUTOCHECKPOINT_PAGES = 10000

_Job = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def run_batch(engine: Engine, jobs: Sequence[_Job]) -> list[tuple[bool, Any]]:
    """Run ``fn(connection, *args, **kwargs)`` for each job in one transaction.

    Returns ``(True, result)`` or ``(False, exception)`` per job, in order; raises (and commits
    nothing) when the transaction itself fails. Runs in a database thread.

    The batch first runs without savepoints (two statements fewer per check, a third of a
    first sighting's). Should any check fail, nothing of that attempt is kept: the transaction
    is rolled back and the whole batch runs again with a savepoint around each check. Nothing
    was answered yet, and each check decides from the database alone, so the second attempt
    gives the answers the first would have given but for the failing check.
    """
    with engine.connect() as conn:
        info = conn.connection.info
        if engine.dialect.name == "sqlite" and "policyd_autocheckpoint" not in info:
            conn.connection.cursor().execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
            info["policyd_autocheckpoint"] = AUTOCHECKPOINT_PAGES
        grey = [n for n, (fn, _args, kwargs) in enumerate(jobs) if _greylisting(fn, kwargs)]
        looked_up = _read_ahead(conn, [jobs[n][1] for n in grey]) if grey else None
        with one_writer(engine):
            results = _attempt(conn, jobs, grey, looked_up, savepoints=False)
            if results is None:
                results = _attempt(conn, jobs, grey, None, savepoints=True)
        assert results is not None
        return results


def _greylisting(fn: Callable[..., Any], kwargs: dict[str, Any]) -> bool:
    """A plain greylisting check (``fn`` possibly wrapped by :class:`policyd.pooled.Tracked`,
    which keeps it as ``.fn``), which batches decide together."""
    return getattr(fn, "fn", fn) is greylist_check and not kwargs


def _read_ahead(conn: Connection, sightings: list[Sighting]) -> Lookup | None:
    """The batch's greylisting read, before the write lock (None: read it under the lock).

    Readers never wait in WAL mode, so the read need not hold the lock the other workers'
    batches queue on: about a quarter of a batch's statements' time under the lock went to
    it, plus the pool checkout, now also taken first. It runs outside any transaction (its
    own snapshot, released at once: the write transaction that follows is not tied to it).
    What another worker writes between this read and the writes is caught by the writes,
    which are all compare-and-set (see :func:`policyd.sql.greylist.lookup_many`).
    """
    try:
        return lookup_many(conn, sightings)
    except Exception:
        return None


def _attempt(conn: Connection, jobs: Sequence[_Job], grey: list[int],
             looked_up: Lookup | None, *, savepoints: bool) -> list[tuple[bool, Any]] | None:
    """One transaction over ``jobs``; None (rolled back) when a check failed without
    savepoints.

    Without savepoints the batch's greylisting checks are decided together first, in a few
    multi-row statements (:func:`policyd.sql.greylist.greylist_many`, which gives the answers
    the checks one by one would), then the other checks one by one; the two kinds touch
    different tables, so their order does not matter. With savepoints every check runs alone.
    """
    results: list[tuple[bool, Any] | None] = [None] * len(jobs)
    conn.begin()
    try:
        write_lock(conn)
        cursor = conn.connection.cursor()
        if not savepoints and grey:
            try:
                decided = greylist_many(conn, [jobs[n][1] for n in grey], fail_fast=True,
                                        looked_up=looked_up)
            except Exception:
                conn.rollback()
                return None
            finally:
                _release(jobs[n][0] for n in grey)
            for n, result in zip(grey, decided, strict=True):
                results[n] = result
        for n, (fn, args, kwargs) in enumerate(jobs):
            if results[n] is not None:
                continue
            if not savepoints:
                try:
                    results[n] = (True, fn(conn, *args, **kwargs))
                except Exception:
                    conn.rollback()
                    return None
                continue
            cursor.execute("SAVEPOINT policy_check")
            try:
                results[n] = (True, fn(conn, *args, **kwargs))
            except Exception as exc:
                cursor.execute("ROLLBACK TO SAVEPOINT policy_check")
                results[n] = (False, exc)
            cursor.execute("RELEASE SAVEPOINT policy_check")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return [result for result in results if result is not None]


def checkpoint(engine: Engine) -> None:
    """Copy the write-ahead log's pages into the database file, without the write lock.

    SQLite checkpoints on the commit that takes the log past ``wal_autocheckpoint`` pages
    (1000 by default), and that commit holds the write lock meanwhile: with two workers on the
    fresh-triplet stream about every thirtieth batch copied a thousand pages and synced the
    file twice while the other worker's batch waited, which made up about half of the time
    batches held the lock. A passive checkpoint needs no write lock: writers go on appending
    to the log while it copies, and SQLite starts the log over once everything in it was
    copied. Runs in a database thread; what it cannot copy (another checkpoint running, a
    reader on old pages) waits for the next one.
    """
    with engine.connect() as conn:
        cursor = conn.connection.cursor()
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
        cursor.fetchall()


def _release(fns: Iterable[Callable[..., Any]]) -> None:
    """Count down the pending work of checks decided without calling them (see
    :class:`policyd.pooled.Tracked`)."""
    for fn in fns:
        release = getattr(fn, "release", None)
        if release is not None:
            release()


class GroupCommit:
    """A runner with the database pool's signature whose work is run in batches.

    ``run(fn, engine, *args, **kwargs)`` runs ``fn(connection, *args, **kwargs)``: ``fn`` is a
    :mod:`policyd.sql` check, which takes an Engine or a Connection in its transaction. At
    most ``max_running`` batches are in the pool at a time (one by default: SQLite has one
    writer anyway); checks submitted meanwhile form the next one.
    """

    def __init__(self, engine: Engine, run: RunInPool, max_batch: int = MAX_BATCH,
                 max_running: int = 1) -> None:
        self._engine = engine
        self._run = run
        #: Batches in the pool at once (SQLite: one, it has one writer anyway).
        self.max_running = max_running
        #: What runs a batch in the pool: ``batch(engine, jobs)``, one ``(ok, value)`` a job.
        self._batch: Callable[[Engine, Sequence[_Job]], list[tuple[bool, Any]]] = run_batch
        self.max_batch = max_batch
        self._queue: list[tuple[_Job, Deferred[Any]]] = []
        self._running = 0
        self._starting = False
        #: Batches run and checks in them (for tests and the curious).
        self.batches = 0
        self.checks = 0
        #: SQLite file databases: batches between checkpoints outside the write lock
        #: (:func:`checkpoint`); None leaves checkpoints to SQLite.
        self.checkpoint_every: int | None = None
        self._checkpoint_at = 0
        self._checkpointing = False
        #: Checkpoints run (for tests and the curious).
        self.checkpoints = 0

    def run(self, fn: Callable[..., Any], engine: Engine, *args: Any, **kwargs: Any
            ) -> Deferred[Any]:
        if engine is not self._engine:
            raise ValueError("a GroupCommit runs checks on its own engine only")
        result: Deferred[Any] = Deferred()
        self._queue.append(((fn, args, kwargs), result))
        self._start()
        return result

    def _start(self) -> None:
        # A loop, not recursion: with a synchronous runner (tests) each batch ends inside
        # self._run, and the next one starts here.
        if self._starting:
            return
        self._starting = True
        try:
            while self._queue and self._running < self.max_running:
                taken = self._queue[:self.max_batch]
                del self._queue[:self.max_batch]
                self._running += 1
                self.batches += 1
                self.checks += len(taken)
                try:
                    work = self._run(self._batch, self._engine, [job for job, _ in taken])
                except Exception:
                    work = Deferred()
                    work.errback(Failure())
                work.addBoth(self._finished, [result for _, result in taken])
        finally:
            self._starting = False

    def _finished(self, outcome: Any, waiting: list[Deferred[Any]]) -> None:
        self._running -= 1
        if (self.checkpoint_every is not None and not self._checkpointing
                and self.batches - self._checkpoint_at >= self.checkpoint_every):
            self._checkpoint()
        if isinstance(outcome, Failure):
            for result in waiting:
                if not result.called:
                    result.errback(outcome)
        else:
            for result, (ok, value) in zip(waiting, outcome, strict=True):
                if result.called:  # timed out meanwhile (answered with its fallback)
                    continue
                if ok:
                    result.callback(value)
                else:
                    result.errback(Failure(value))
        self._start()


    def _checkpoint(self) -> None:
        """Run :func:`checkpoint` in the pool beside the batches; a failure is only logged
        (SQLite's own checkpoints are the backstop)."""
        self._checkpointing = True
        self._checkpoint_at = self.batches
        self.checkpoints += 1
        try:
            work = self._run(checkpoint, self._engine)
        except Exception:
            work = Deferred()
            work.errback(Failure())

        def done(outcome: Any) -> None:
            self._checkpointing = False
            if isinstance(outcome, Failure):
                _log.failure("checkpoint of the state database failed", outcome)

        work.addBoth(done)


class GreylistBatches(GroupCommit):
    """PostgreSQL: the greylisting checks that arrive while a batch runs go together, in one
    multi-row statement that commits on its own (:func:`policyd.sql.greylist.greylist_many`);
    other checks (rate limits) go to the pool one by one, as before.

    A check on PostgreSQL used to pay, besides its two statements, a pool checkout with its
    pre-ping (a third round trip), the switch to autocommit and back, and two thread hand-offs:
    about 760 µs of policyd CPU per request. A batch pays them once for all its checks. The
    connection goes back to the pool after each batch (a connection kept out of it would
    starve the other users of a one-connection pool). Should it be found dead by the batch's
    statement (it died after the pool's pre-ping, or before the statement's answer came back),
    the batch runs once more on another (see :func:`policyd.sql.greylist.greylist_many` for
    why that gives the same answers); one lost later, in the sightings decided one by one,
    fails the batch (every check answers its fallback, as on a timeout). Unlike a transaction
    over the batch, no row lock outlives its statement, so other hosts never wait on a batch's
    triplets. ``max_running`` batches may run at once, each on its own connection (they are to
    each other what two hosts are); one, the default, gave the larger batches and the least
    CPU per check, in policyd and in PostgreSQL, on the benchmark's two cores (two at once:
    about 50 % more PostgreSQL CPU per request and lower throughput).
    """

    def __init__(self, engine: Engine, run: RunInPool, max_batch: int = MAX_BATCH,
                 max_running: int = 1) -> None:
        super().__init__(engine, run, max_batch, max_running)
        self._batch = self._greylist_batch
        #: Connections found dead by a batch and replaced (for tests and the curious).
        self.reconnects = 0

    def run(self, fn: Callable[..., Any], engine: Engine, *args: Any, **kwargs: Any
            ) -> Deferred[Any]:
        if not _greylisting(fn, kwargs):
            return self._run(fn, engine, *args, **kwargs)
        return super().run(fn, engine, *args)

    def _greylist_batch(self, engine: Engine, jobs: Sequence[_Job]) -> list[tuple[bool, Any]]:
        """Runs in a database thread."""
        sightings: list[Sighting] = [args for _fn, args, _kwargs in jobs]
        try:
            for attempt in (1, 2):
                with engine.connect() as conn:
                    dbapi: Any = conn.connection.dbapi_connection
                    dbapi.autocommit = True  # each statement is its own transaction
                    try:
                        results = greylist_many(conn, sightings)
                    except StaleConnection:
                        self.reconnects += 1
                        conn.invalidate()
                        if attempt == 2:
                            raise
                        continue
                    except BaseException:
                        with suppress(Exception):  # already gone: nothing to give back
                            conn.invalidate()
                        raise
                    dbapi.autocommit = False
                    return results
            raise AssertionError("unreachable")
        finally:
            _release(fn for fn, _args, _kwargs in jobs)


def batching_runner(engine: Engine, run: RunInPool) -> RunInPool:
    """The runner for the state checks: group commit on SQLite, greylisting batches on
    PostgreSQL, ``run`` itself on MariaDB (whose upsert returns no row: its greylisting is one
    transaction per check, see :mod:`policyd.sql.greylist`)."""
    if engine.dialect.name == "sqlite":
        group = GroupCommit(engine, run)
        database = engine.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            group.checkpoint_every = CHECKPOINT_EVERY
        return group.run
    if engine.dialect.name == "postgresql":
        return GreylistBatches(engine, run).run
    return run
