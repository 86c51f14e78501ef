# -*- test-case-name: tests.unit.test_ratelimit -*-
"""Transactions for policyd's state: isolation, one SQLite writer per process, the write lock,
and hot statements compiled once per dialect and run on the DBAPI cursor (upserts are the
core's :mod:`mailplugins.db.upsert`)."""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
)


def transaction(engine: Engine) -> Any:
    """A connection for one check-and-count transaction, at the backend's default isolation.

    That is enough: the transaction's first statement is the locking upsert of the subject
    row, so on PostgreSQL (READ COMMITTED) each later statement sees what the previous holder
    of the lock committed, and on MariaDB (REPEATABLE READ) the read view is only created by
    the first plain SELECT, after the lock is held. SQLite has a single writer.
    """
    return engine.connect()


#: Per engine: the process's writer lock, the lock file's descriptor, and the process that
#: opened it (a forked child opens its own: flock locks are shared by a descriptor's copies).
_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, tuple[threading.Lock, int | None, int]] = (
    weakref.WeakKeyDictionary())
_SQLITE_WRITERS_LOCK = threading.Lock()


@contextmanager
def one_writer(engine: Engine) -> Iterator[None]:
    """On SQLite, one writing transaction at a time per process, and processes in turn.

    SQLite has one writer per database anyway. A writer that finds the database locked gets
    SQLITE_BUSY and sleeps in the busy handler (1, 2, 5, 10, ... ms, retrying between naps):
    threads of one process queue on a lock instead, and the processes of one host (policyd's
    workers) on an ``flock`` of ``<database>.writer`` beside the file, which wakes the next
    writer the moment the current one is done. Without it, one process whose batches follow
    each other kept the database while the other slept in ever longer naps (the tail latency
    of several workers). Other programs writing the file are still held off by SQLite's own
    locking; the lock file is only a queue.
    """
    if engine.dialect.name != "sqlite":
        yield
        return
    with _SQLITE_WRITERS_LOCK:
        found = _SQLITE_WRITERS.get(engine)
        if found is None or found[2] != os.getpid():
            found = _SQLITE_WRITERS[engine] = (threading.Lock(), _lock_file(engine), os.getpid())
    lock, descriptor, _pid = found
    with lock:
        if descriptor is None:
            yield
            return
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)


def _lock_file(engine: Engine) -> int | None:
    """The descriptor of the database's writer lock file; None for an in-memory database or
    when the file cannot be opened (SQLite's locking alone then)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    try:
        descriptor = os.open(f"{database}.writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    except OSError:
        return None
    weakref.finalize(engine, os.close, descriptor)
    return descriptor


def write_lock(conn: Connection) -> None:
    """On SQLite, take the database write lock before the first read of a read-then-write
    transaction. Otherwise a transaction that read first and then writes after another
    connection committed fails at once with "database is locked" (WAL snapshot), without
    waiting for busy_timeout. A no-op UPDATE opens a write transaction and so waits properly.
    The server backends lock rows instead (FOR UPDATE, upserts)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("UPDATE policy_greylist_clients SET passes = passes WHERE 0")


Target = Engine | Connection


class Compiled:
    """A statement compiled once per dialect and run on the DBAPI cursor directly.

    The rate check runs a handful of statements per message; building, caching and executing
    SQLAlchemy constructs each time cost several times more than SQLite itself, so the hot
    statements are compiled to the driver's SQL once and executed on the raw cursor, inside
    the transaction the SQLAlchemy connection began (callers call ``conn.begin()`` first).
    """

    def __init__(self, stmt: Any, conn: Connection) -> None:
        compiled = stmt.compile(dialect=conn.dialect)
        self.sql = str(compiled)
        self.positions: Sequence[str] | None = compiled.positiontup

    def run(self, conn: Connection, **params: Any) -> Any:
        cursor = conn.connection.cursor()
        if self.positions is not None:
            cursor.execute(self.sql, tuple(params[n] for n in self.positions))
        else:
            cursor.execute(self.sql, params)
        return cursor


_COMPILED: dict[tuple[str, str], Compiled] = {}


def compiled(conn: Connection, name: str, build: Any) -> Compiled:
    key = (conn.dialect.name, name)
    found = _COMPILED.get(key)
    if found is None:
        found = _COMPILED[key] = Compiled(build(conn), conn)
    return found
