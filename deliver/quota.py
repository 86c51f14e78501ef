# -*- test-case-name: tests.unit.test_deliver_maildir -*-
"""Quota usage in the Maildir++ ``maildirsize`` format (blocking; runs in the disk pool).

``maildirsize`` is what Dovecot's ``quota = maildir`` backend, maildrop and Courier read and
write: a first line with the limit (``<bytes>S``), then ``<bytes> <count>`` lines that are
summed. deliver appends one line per delivered message, and recalculates the file (by message
names' ``S=`` field, else stat) when it is missing, grows past 5120 bytes, or names a different
limit.

Dovecot only records expunges in ``maildirsize`` when its own quota plugin is enabled, so the
tracked usage may be too high; a rejection is therefore always confirmed by a fresh recount
(at most once per :data:`RECOUNT_INTERVAL` per mailbox), and a user who deleted mail is never
refused because of a stale file.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from deliver.files import replace_file

__all__ = ["QuotaCheck", "add_usage", "check_quota", "count_usage", "read_usage"]

MAILDIRSIZE = "maildirsize"
#: The Maildir++ spec recalculates a maildirsize file larger than this.
MAX_MAILDIRSIZE = 5120
RECOUNT_INTERVAL = 60.0
_SIZE_FIELD = re.compile(r",S=(\d+)")


@dataclass(frozen=True)
class QuotaCheck:
    limit: int
    used: int

    @property
    def room(self) -> int:
        return max(0, self.limit - self.used)

    def fits(self, size: int) -> bool:
        return self.limit <= 0 or self.used + size <= self.limit


def _message_dirs(maildir: str) -> list[str]:
    dirs = [os.path.join(maildir, "cur"), os.path.join(maildir, "new")]
    try:
        entries = list(os.scandir(maildir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(".") and entry.name not in (".", "..") and entry.is_dir():
            dirs.append(os.path.join(entry.path, "cur"))
            dirs.append(os.path.join(entry.path, "new"))
    return dirs


def count_usage(maildir: str) -> tuple[int, int]:
    """(bytes, messages) of every folder, from ``S=`` in names (stat when absent)."""
    total = count = 0
    for directory in _message_dirs(maildir):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            match = _SIZE_FIELD.search(entry.name)
            if match:
                size = int(match.group(1))
            else:
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
            total += size
            count += 1
    return total, count


def _parse(text: str) -> tuple[int | None, int]:
    lines = text.split("\n")
    limit: int | None = None
    head = lines[0].strip()
    for part in head.split(","):
        if part.endswith("S") and part[:-1].isdigit():
            limit = int(part[:-1])
    used = 0
    for line in lines[1:]:
        fields = line.split()
        if fields and re.fullmatch(r"-?\d+", fields[0]):
            used += int(fields[0])
    return limit, used


def _write_fresh(
    maildir: str, limit: int, used: int, count: int, writer_uid_gid: tuple[int, int] | None
) -> None:
    """Replace ``maildirsize`` atomically (tmp file + rename), as the spec asks."""
    replace_file(maildir, MAILDIRSIZE, f"{limit}S\n{used} {count}\n".encode("ascii"), writer_uid_gid)


def read_usage(
    maildir: str,
    limit: int,
    *,
    owner: tuple[int, int] | None = None,
    recount: bool = False,
) -> int:
    """Bytes used, from ``maildirsize`` or a recount (which then rewrites the file)."""
    path = os.path.join(maildir, MAILDIRSIZE)
    if not recount:
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_MAILDIRSIZE + 1)
        except FileNotFoundError:
            data = None
        if data is not None and len(data) <= MAX_MAILDIRSIZE:
            file_limit, used = _parse(data.decode("ascii", "replace"))
            if file_limit == limit and used >= 0:
                return used
    used, count = count_usage(maildir)
    with contextlib.suppress(OSError):
        _write_fresh(maildir, limit, used, count, owner)
    return used


def add_usage(maildir: str, size: int) -> None:
    """Append ``<size> 1`` when ``maildirsize`` exists (O_APPEND: concurrent writers are safe)."""
    path = os.path.join(maildir, MAILDIRSIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.write(fd, f"{size} 1\n".encode("ascii"))
    finally:
        os.close(fd)


class QuotaTracker:
    """Quota decisions for the disk pool: tracked usage, confirmed by a recount before refusing."""

    def __init__(self, owner: tuple[int, int] | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._owner = owner
        self._clock = clock
        self._recounted: dict[str, float] = {}

    def check(self, maildir: str, limit: int, size: int) -> QuotaCheck:
        if limit <= 0:
            return QuotaCheck(0, 0)
        used = read_usage(maildir, limit, owner=self._owner)
        result = QuotaCheck(limit, used)
        if result.fits(size):
            return result
        now = self._clock()
        last = self._recounted.get(maildir)
        if last is not None and now - last < RECOUNT_INTERVAL:
            return result
        if len(self._recounted) > 100_000:
            self._recounted.clear()
        self._recounted[maildir] = now
        return QuotaCheck(limit, read_usage(maildir, limit, owner=self._owner, recount=True))

    def record(self, maildir: str, limit: int, size: int) -> None:
        if limit > 0:
            add_usage(maildir, size)


def check_quota(maildir: str, limit: int, size: int) -> QuotaCheck:
    """One-off check without a tracker (tests, tools)."""
    return QuotaTracker(None).check(maildir, limit, size)
