"""The architecture map in CONTRIBUTING.md, checked: imports point inward.

The core (``mailplugins``) finds the daemons through entry points and never imports one; the
dev rig is imported by nothing installed; the codecs are transport-free (no Twisted).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ("policyd", "authd", "deliver", "milterd")
CODECS = ("policyd/codec.py", "authd/sasl_codec.py", "authd/dict_codec.py", "deliver/lmtp_codec.py",
          "milterd/codec.py")


def imports(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in ``path`` (functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def top(name: str) -> str:
    return name.split(".", 1)[0]


def test_the_core_imports_no_daemon_and_no_dev_rig() -> None:
    offending = {
        str(path.relative_to(ROOT)): sorted(n for n in imports(path) if top(n) in (*DAEMONS, "devrig"))
        for path in (ROOT / "mailplugins").rglob("*.py")
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_daemons_do_not_import_each_other_or_the_dev_rig() -> None:
    offending = {}
    for daemon in DAEMONS:
        for path in (ROOT / daemon).rglob("*.py"):
            names = sorted(n for n in imports(path) if top(n) in (*DAEMONS, "devrig") and top(n) != daemon)
            if names:
                offending[str(path.relative_to(ROOT))] = names
    assert offending == {}


def test_codecs_are_transport_free() -> None:
    offending = {codec: sorted(n for n in imports(ROOT / codec) if top(n) == "twisted") for codec in CODECS}
    assert {codec: names for codec, names in offending.items() if names} == {}
