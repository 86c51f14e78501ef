"""What every benchmark script says about the machine it ran on, so its figures can be judged.

A figure from this shared 2-core machine means little without the load beside it and the
software it was measured against: each script in ``bench/`` prints the Debian release and the
load average (``os.getloadavg``) before its measurements and the load average after, and the
scripts that run stock Postfix or Dovecot say which versions (from the release they ran, the
host's or a root built by the test rig). The scripts find this module because Python puts a
script's own directory first on ``sys.path``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Release(Protocol):
    """What this module needs of ``devrig.release.Release`` (not imported: not every script
    puts the repository on ``sys.path``)."""

    @property
    def name(self) -> str: ...

    @property
    def root(self) -> Path | None: ...

    def command(self, argv: Sequence[str]) -> list[str]: ...


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def debian_release(os_release: Path = Path("/etc/os-release")) -> str:
    """``PRETTY_NAME`` from os-release (``Debian GNU/Linux 12 (bookworm)``)."""
    try:
        lines = os_release.read_text().splitlines()
    except OSError:
        return "unknown OS (no /etc/os-release)"
    for line in lines:
        key, _, value = line.partition("=")
        if key == "PRETTY_NAME":
            return value.strip().strip('"')
    return "unknown OS (no PRETTY_NAME in /etc/os-release)"


def stock_versions(release: Release, *, postfix: bool = False, dovecot: bool = False) -> str:
    """``stock Postfix 3.7.11, Dovecot 2.3.19.1 (debian12, the host's)``: the full versions the
    script ran against, asked of the release's own binaries."""
    parts = []
    if postfix:
        parts.append("Postfix " + _first_word(release.command(["postconf", "-d", "-h", "mail_version"])))
    if dovecot:
        parts.append("Dovecot " + _first_word(release.command(["dovecot", "--version"])))
    where = "the host's" if release.root is None else f"root {release.root}"
    return f"stock {', '.join(parts)} ({release.name}, {where})"


def _first_word(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout.split()
    return out[0] if out else "(version unknown)"


def print_before(against: str = "") -> None:
    """The machine, the software measured against (if any), and the load before the runs."""
    print(f"machine: {debian_release()}, {os.cpu_count()} CPUs (shared); "
          f"load average before: {load_average()}", flush=True)
    if against:
        print(f"against {against}", flush=True)


def print_after() -> None:
    """The load average once the measurements are done."""
    print(f"load average after: {load_average()}", flush=True)
