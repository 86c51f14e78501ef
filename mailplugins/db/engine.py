# -*- test-case-name: tests.unit.test_store -*-
"""Engine creation: the per-backend settings that make SQLite safe for several processes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from mailplugins.config import DatabaseConfig

#: Milliseconds SQLite waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 5000


def make_engine(config: DatabaseConfig) -> Engine:
    url = make_url(config.url)
    kwargs: dict[str, Any] = {"future": True}
    if url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        if not url.database or url.database == ":memory:":
            # One shared in-memory database for every thread (tests).
            kwargs["poolclass"] = StaticPool
        else:
            kwargs["pool_size"] = config.pool_size
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling is off (see _sqlite_pragmas): emit BEGIN here so
        # SQLAlchemy's transactions are real ones. Writes that must be atomic across processes
        # are single statements, so reads never need the write lock.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        return engine
    kwargs.update(pool_size=config.pool_size, max_overflow=0, pool_pre_ping=True,
                  pool_recycle=3600, pool_timeout=max(config.timeout, 1.0))
    if url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": max(1, int(config.timeout))}
    elif url.get_backend_name() in ("mysql", "mariadb"):
        timeout = max(1, int(config.timeout))
        kwargs["connect_args"] = {"connect_timeout": timeout, "charset": "utf8mb4"}
    return create_engine(url, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not pysqlite, decide when transactions begin (see the "begin" hook).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()
