# -*- test-case-name: tests.unit.test_db_revision -*-
"""The schema revision this code needs and the one a database has, read without Alembic.

Every daemon process (each worker too) checks the schema once at startup. Importing Alembic
for that one ``SELECT`` brought Mako and Pygments with it: about 15 MiB of memory in every
process for the life of the process. :mod:`mailplugins.db.schema` (``mailplugins db upgrade``)
still uses Alembic; ``tests.unit.test_db_revision`` pins :data:`HEAD` to Alembic's head, so a
new migration cannot leave it behind.
"""

from __future__ import annotations

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

#: The newest migration in mailplugins/db/migrations/versions.
HEAD = "0006"


def current_revision(engine: Engine) -> str | None:
    """The revision stamped in the database; None when it was never upgraded.

    Raises the driver's error when the database cannot be reached (the caller decides).
    """
    with engine.connect() as connection:
        try:
            rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        except DBAPIError:
            if connection.closed or connection.invalidated:
                raise
            # No alembic_version table (an empty database), or a reachable one that failed
            # the query: ask whether the table exists before calling it unreachable.
            from sqlalchemy import inspect

            connection.rollback()
            if "alembic_version" in inspect(connection).get_table_names():
                raise
            return None
    return rows[0][0] if len(rows) == 1 else None
