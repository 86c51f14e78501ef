# -*- test-case-name: tests.unit.test_deliver_groupsync -*-
"""Group fsync of a directory: concurrent deliveries into one ``new/`` share one fsync.

A delivery links its file into ``new/`` and must not answer 250 before that directory entry is
on disk, so it fsyncs the directory. When several disk threads deliver into the same directory
at once (a busy mailbox, an alias, a list), each fsync forces its own journal commit and cache
flush, although one fsync that *starts after* all their links covers every one of them.

:meth:`GroupSync.sync` gives exactly that guarantee: it returns only once an fsync of the
directory that began after the call began has succeeded. The first caller runs the fsync;
callers arriving while it runs wait for it to finish and then run one more fsync between them
(the one in progress may have started before their links), so N concurrent callers cost about
two fsyncs instead of N. An error is never shared: a caller whose covering fsync failed runs
its own, and raises what that one raises.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["GroupSync", "fsync_directory"]


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Directory:
    #: Tickets handed out: a caller's ticket is taken after its link.
    issued: int = 0
    #: Every ticket up to this one is covered by an fsync that succeeded.
    covered: int = 0
    running: bool = False
    #: Callers inside sync() for this directory (the entry is dropped at zero).
    users: int = 0


class GroupSync:
    """Durable directory entries with shared fsyncs (blocking; called from the disk pool)."""

    def __init__(self, fsync: Callable[[str], None] = fsync_directory) -> None:
        self._fsync = fsync
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._directories: dict[str, _Directory] = {}

    def sync(self, path: str) -> None:
        """Return once everything done in ``path`` before this call is on disk."""
        with self._lock:
            state = self._directories.get(path)
            if state is None:
                state = self._directories[path] = _Directory()
            state.users += 1
            state.issued += 1
            ticket = state.issued
            try:
                while state.covered < ticket:
                    if not state.running:
                        self._run(path, state)
                    else:
                        self._changed.wait()
            finally:
                state.users -= 1
                if state.users == 0:
                    del self._directories[path]

    def _run(self, path: str, state: _Directory) -> None:
        """One fsync covering every ticket issued so far (called and returning with the lock
        held; the fsync itself runs without it)."""
        state.running = True
        upto = state.issued
        self._lock.release()
        try:
            self._fsync(path)
        finally:
            self._lock.acquire()
            state.running = False
            self._changed.notify_all()
        state.covered = max(state.covered, upto)


#: One per process: every MaildirWriter (a reload makes new ones) shares it.
DIRECTORY_SYNC = GroupSync()
