"""mailplugins.db.revision: the daemons' schema check without Alembic agrees with Alembic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine

from mailplugins.db import revision, schema


def test_head_is_alembics_head() -> None:
    assert schema.head_revision() == revision.HEAD


def test_current_revision_of_empty_partial_and_upgraded_databases(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/m.db")
    try:
        assert revision.current_revision(engine) is None
        schema.upgrade(engine, "0004")
        assert revision.current_revision(engine) == schema.current_revision(engine) == "0004"
        schema.upgrade(engine)
        assert revision.current_revision(engine) == revision.HEAD
    finally:
        engine.dispose()


def test_the_daemon_runner_does_not_import_alembic() -> None:
    code = "import sys, mailplugins.runner, deliver.daemon; print('alembic' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
