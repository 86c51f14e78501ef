"""Shared fixtures: scratch directories for e2e rigs and one database per backend."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from devrig.leftovers import stop_dead_runs
from devrig.release import NAMES, Release
from devrig.release import release as find_release
from tests.rig import RigFactory, short_tempdir
from tests.support.sync import migrated_engine

PG_ADMIN_URL = os.environ.get("MAILPLUGINS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_ADMIN_URL = os.environ.get("MAILPLUGINS_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop the Postfix/Dovecot instances a killed earlier run left behind (its own live
    instances and other sessions' are left alone)."""
    stop_dead_runs()


@pytest.fixture
def rig_dir() -> Iterator[Path]:
    """A short scratch directory (unix socket paths must stay under 108 bytes)."""
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=NAMES, ids=[name.replace("debian", "deb") for name in NAMES])
def release(request: pytest.FixtureRequest) -> Release:
    """The Debian release whose stock Postfix and Dovecot an e2e module runs against: each
    such module runs once on Debian 12's (Postfix 3.7, Dovecot 2.3) and once on Debian 13's
    (Postfix 3.10, Dovecot 2.4), one of them from the root scripts/test builds."""
    chosen = find_release(str(request.param))
    chosen.check()
    return chosen


@pytest.fixture
def rig_factory(release: Release) -> Iterator[RigFactory]:
    """A RigFactory for one test on ``release``: its instances stop when the test ends."""
    with RigFactory(release) as factory:
        yield factory


def _server_database(admin_url: str, backend: str) -> Generator[str, None, None]:
    """A fresh, uniquely named database on a local server, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"mp_{uuid.uuid4().hex[:12]}"
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
    except Exception as exc:  # the server is absent: skip, saying why
        pytest.skip(f"{backend} server not reachable at {admin_url}: {type(exc).__name__}")
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
                ))
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test against SQLite (file, WAL), PostgreSQL and MariaDB."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/mail.db"
    elif request.param == "postgresql":
        yield from _server_database(PG_ADMIN_URL, "postgresql")
    else:
        yield from _server_database(MYSQL_ADMIN_URL, "mysql")


@pytest.fixture
def engine() -> Iterator[Engine]:
    """An in-memory SQLite engine with the schema (one connection)."""
    yield from migrated_engine("sqlite://", pool_size=1)


@pytest.fixture
def any_engine(database_url: str) -> Iterator[Engine]:
    """An engine with the schema on each backend of ``database_url``."""
    yield from migrated_engine(database_url, pool_size=2)
