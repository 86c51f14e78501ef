"""mailplugins.db.base / tables: table modules stand alone; tables gathers the whole schema."""

from __future__ import annotations

import subprocess
import sys


def imported_after(module: str) -> set[str]:
    """The mailplugins.db modules loaded by importing ``module`` in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('mailplugins.db')))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(output.stdout.split())


def test_a_table_module_loads_only_the_base() -> None:
    """models.py imported the other table modules at its bottom (an import cycle worked around)."""
    assert imported_after("mailplugins.db.models") == {
        "mailplugins.db", "mailplugins.db.base", "mailplugins.db.models"}
    assert imported_after("mailplugins.db.auth_models") == {
        "mailplugins.db", "mailplugins.db.base", "mailplugins.db.auth_models"}


def test_tables_holds_every_table() -> None:
    from mailplugins.db.tables import metadata

    assert {"domains", "mailboxes", "policy_rate_subjects", "policy_greylist", "auth_failures",
            "dkim_keys"} <= set(metadata.tables)
