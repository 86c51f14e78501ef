"""Every ``# -*- test-case-name: ... -*-`` header names test modules that exist.

The header tells a reader (and Twisted-aware editors) where a module's tests are; one naming a
module that does not exist sends them nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mailplugins", "policyd", "authd", "deliver", "milterd", "devrig")
HEADER = re.compile(r"^# -\*- test-case-name: (?P<names>[\w., ]+) -\*-$", re.MULTILINE)


def headers() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            match = HEADER.search(path.read_text(encoding="utf-8")[:500])
            if match:
                names = [n.strip() for n in match.group("names").split(",") if n.strip()]
                found[str(path.relative_to(ROOT))] = names
    return found


def test_headers_name_existing_test_modules() -> None:
    found = headers()
    assert len(found) > 50  # the pattern still matches the headers
    stale = {
        source: name
        for source, names in found.items()
        for name in names
        if not (ROOT / (name.replace(".", "/") + ".py")).is_file()
    }
    assert stale == {}
