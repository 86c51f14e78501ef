# -*- test-case-name: tests.unit.test_ratelimit -*-
"""Transactions for policyd's state: isolation, one SQLite writer per process, the write lock,
and hot statements compiled once per dialect and run on the DBAPI cursor (upserts are the
core's :mod:`mailplugins.db.upsert`)."""

from __future__ import annotations

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


_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_SQLITE_WRITERS_LOCK = threading.Lock()


@contextmanager
def one_writer(engine: Engine) -> Iterator[None]:
    """On SQLite, one writing transaction per process at a time.

    SQLite has one writer per database anyway; threads of one process that compete for it get
    SQLITE_BUSY and sleep in the busy handler (milliseconds each time), which wastes far more
    than waiting on a lock. Other processes are still held off by SQLite's own locking.
    """
    if engine.dialect.name != "sqlite":
        yield
        return
    with _SQLITE_WRITERS_LOCK:
        lock = _SQLITE_WRITERS.get(engine)
        if lock is None:
            lock = _SQLITE_WRITERS[engine] = threading.Lock()
    with lock:
        yield


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
