# -*- test-case-name: tests.unit.test_auth_failures -*-
"""One atomic insert-or-update statement on SQLite, PostgreSQL and MariaDB.

Counters shared by several hosts must change in a single statement: a read followed by a write
loses updates when two processes race. Each backend spells upsert differently; this is the one
place that knows how.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects import mysql, postgresql, sqlite

#: ``updates`` maps a column to ``fn(columns, new)``: ``columns`` are the stored row's columns,
#: ``new`` the proposed row's (``excluded`` / ``inserted``).
Update = Callable[[Any, Any], Any]


def insert_for(conn: Connection, table: Any) -> Any:
    """The dialect's own INSERT construct (the one with upsert support)."""
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name in ("mysql", "mariadb"):
        return mysql.insert(table)
    return sqlite.insert(table)


def upsert_stmt(
    conn: Connection,
    table: Any,
    values: Mapping[str, Any],
    keys: Sequence[str],
    updates: Mapping[str, Update],
) -> Any:
    """INSERT ``values``; on a conflict on ``keys`` apply ``updates`` instead, atomically.

    On MariaDB the assignments run left to right and each sees the columns already assigned:
    order ``updates`` so that a column is read before it is overwritten.
    """
    stmt = insert_for(conn, table).values(**values)
    if conn.dialect.name in ("mysql", "mariadb"):
        new = stmt.inserted
        return stmt.on_duplicate_key_update(
            **{column: fn(table.c, new) for column, fn in updates.items()}
        )
    new = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=list(keys),
        set_={column: fn(table.c, new) for column, fn in updates.items()},
    )
