"""The deliberate differences from stock Dovecot, read from ``docs/dovecot-differences.md``.

The differential e2e tests send the same session to Dovecot and to our daemon and compare the
outcome; a difference is allowed only where the table in that page lists the case, so the page
and the suite cannot drift apart: a difference the page does not list fails the suite, and a
listed case that no longer differs is reported by ``unused`` for the test to fail on too.
"""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "dovecot-differences.md"

_ROW = re.compile(r"^\|\s*`(?P<case>[a-z0-9][a-z0-9._-]*)`\s*\|(?P<rest>.*)\|\s*$")


def allowed_differences(section: str, page: Path = PAGE) -> dict[str, str]:
    """Case id -> the row's last column (the reason), for the table under ``## {section}``."""
    cases: dict[str, str] = {}
    inside = found = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            inside = line[3:].strip() == section
            found = found or inside
            continue
        if not inside:
            continue
        match = _ROW.match(line)
        if match is None:
            continue
        case = match["case"]
        if case in cases:
            raise ValueError(f"{page.name}: case {case!r} is listed twice under {section!r}")
        cases[case] = match["rest"].split("|")[-1].strip()
    if not found:
        raise KeyError(f"{page.name} has no section {section!r}")
    return cases


def unexpected(differing: set[str], section: str) -> set[str]:
    """The differing cases the page does not list."""
    return differing - set(allowed_differences(section))


def unused(differing: set[str], section: str, checked: set[str]) -> set[str]:
    """Listed cases that were checked in this run and no longer differ."""
    return (set(allowed_differences(section)) & checked) - differing
