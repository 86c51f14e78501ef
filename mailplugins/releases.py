# -*- test-case-name: tests.unit.test_wiring_postfix -*-
"""Which Postfix and Dovecot the generated settings are for: detected, or named by the operator.

Debian 12 ships Postfix 3.7 and Dovecot 2.3, Debian 13 Postfix 3.10 and Dovecot 2.4; the two
Dovecots accept different configuration languages, so ``dovecot-config`` must know which one it
writes for. ``dovecot --version`` and ``postconf -d -h mail_version`` answer on the host itself;
``--dovecot-version``/``--postfix-version`` generate for another host.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence

__all__ = [
    "DOVECOT_RELEASES",
    "detect_dovecot",
    "detect_postfix",
    "dovecot_release",
    "postfix_release",
]

#: Dovecot major.minor releases the generators write for.
DOVECOT_RELEASES = ("2.3", "2.4")
#: The oldest Postfix the generated settings are known to suit (Debian 12's).
OLDEST_POSTFIX = (3, 7)

_VERSION = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?")


def _major_minor(text: str, what: str) -> tuple[int, int]:
    found = _VERSION.match(text)
    if found is None:
        raise ValueError(f"{what}: {text.strip()[:40]!r} is not a version number")
    return int(found.group(1)), int(found.group(2))


def dovecot_release(text: str) -> str:
    """``2.4.1-4 (7d8c0e5759)`` -> ``2.4``; ValueError for a release we do not write for."""
    major, minor = _major_minor(text, "Dovecot version")
    release = f"{major}.{minor}"
    if release not in DOVECOT_RELEASES:
        raise ValueError(f"Dovecot {release} is not supported (2.3 or 2.4; --dovecot-version)")
    return release


def postfix_release(text: str) -> str:
    """``3.10.13`` -> ``3.10``; ValueError for a Postfix older than 3.7 or not 3.x."""
    major, minor = _major_minor(text, "Postfix version")
    if major != 3 or (major, minor) < OLDEST_POSTFIX:
        raise ValueError(f"Postfix {major}.{minor} is not supported (3.7 or later 3.x; --postfix-version)")
    return f"{major}.{minor}"


RunCommand = Callable[[Sequence[str]], str]


def _run(cmd: Sequence[str]) -> str:
    try:
        result = subprocess.run(  # noqa: S603 - fixed tool names
            list(cmd), capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout if result.returncode == 0 else ""


def detect_dovecot(run: RunCommand = _run) -> str:
    """The installed Dovecot's major.minor; ValueError when it cannot be told."""
    text = run(["dovecot", "--version"])
    if not text.strip():
        raise ValueError("cannot run 'dovecot --version': give --dovecot-version 2.3 or 2.4")
    return dovecot_release(text)


def detect_postfix(run: RunCommand = _run) -> str:
    """The installed Postfix's major.minor; ValueError when it cannot be told."""
    text = run(["postconf", "-d", "-h", "mail_version"])  # -d: needs no main.cf
    if not text.strip():
        raise ValueError("cannot run 'postconf -d -h mail_version': give --postfix-version")
    return postfix_release(text)
