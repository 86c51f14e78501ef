# -*- test-case-name: tests.unit.test_devrig -*-
"""Stop the Postfix and Dovecot instances of test runs that died without cleaning up.

A test's finalizers stop what it started, but a run killed outright (SIGKILL, a lost terminal)
leaves its Postfix and Dovecot masters running on their ports. Each rig scratch directory holds
an ``owner`` file naming the process that made it (pid and start time, so a reused pid does not
count as alive); at the start of a session every such directory whose owner is gone has its
instances stopped by the pids in their own pid files and is removed. Directories of live runs
(other sessions on the same machine) are left alone. Mounts need no cleanup: a release root's
mounts live in a private namespace that ends with its processes (see :mod:`devrig.release`).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

OWNER = "owner"
#: The pid files a rig directory's instances leave (Postfix's master, Dovecot's master).
PID_FILES = ("postfix/queue/pid/master.pid", "dovecot/run/master.pid")
#: What those processes' command names start with; anything else under a reused pid is spared.
COMMANDS = ("master", "dovecot")


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def mark_owner(root: Path, pid: int | None = None) -> None:
    """Record that the process ``pid`` (this one by default) owns the rig directory ``root``."""
    pid = pid or os.getpid()
    (root / OWNER).write_text(f"{pid} {start_time(pid)}\n")


def owner_alive(root: Path) -> bool:
    try:
        pid_text, started = (root / OWNER).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return True  # not ours, or half written: leave it
    return start_time(pid) == started


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return
    if not name.startswith(COMMANDS):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)


def stop_dead_runs(base: Path | None = None) -> list[Path]:
    """Stop and remove every rig directory under ``base`` (the temp dir) whose owner is gone;
    returns the directories removed."""
    removed = []
    for owner in sorted(Path(base or tempfile.gettempdir()).glob(f"*/{OWNER}")):
        root = owner.parent
        if owner_alive(root):
            continue
        for pid_file in PID_FILES:
            _stop(root / pid_file)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed
