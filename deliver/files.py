# -*- test-case-name: tests.unit.test_deliver_maildir -*-
"""File primitives under the Maildir writer: whole writes, kernel copies, atomic replacement,
stale-file sweeps (blocking; disk pool only)."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from typing import IO

__all__ = [
    "DeliveryError",
    "clean_stale",
    "copy_spool",
    "replace_file",
    "unlink_quietly",
    "write_all",
    "write_both",
]

COPY_CHUNK = 1024 * 1024


class DeliveryError(Exception):
    """A write that failed for one folder; ``temporary`` decides 4xx vs 5xx, ``full`` 4.2.2."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of ``data`` is written: a write may be short when the disk fills,
    and only the next one raises ENOSPC."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_both(fd: int, first: bytes, second: bytes) -> None:
    """``first`` then ``second``, in one writev when the disk takes it all (one system call per
    message instead of two)."""
    written = os.writev(fd, [first, second])
    if written < len(first):
        write_all(fd, first[written:])
        write_all(fd, second)
    elif written < len(first) + len(second):
        write_all(fd, second[written - len(first) :])


def copy_spool(source: IO[bytes], fd: int, size: int, start: int = 0) -> None:
    """Copy ``size`` bytes of the spool file from ``start`` into ``fd``, in the kernel when it
    can (copy_file_range)."""
    src = source.fileno()
    offset = start
    end = start + size
    try:
        while offset < end:
            copied = os.copy_file_range(src, fd, end - offset, offset)
            if copied == 0:
                break
            offset += copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while offset < end:
        chunk = os.pread(src, min(COPY_CHUNK, end - offset), offset)
        if not chunk:
            raise DeliveryError("spool file shorter than expected")
        write_all(fd, chunk)
        offset += len(chunk)


def replace_file(maildir: str, name: str, data: bytes, owner: tuple[int, int] | None) -> None:
    """Replace ``maildir/name`` atomically: a new file in the Maildir's ``tmp/``, then a rename
    (the Maildir++ way for ``maildirsize``), owned by ``owner`` when given."""
    tmp = os.path.join(maildir, "tmp", f"{name}.{os.getpid()}.{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(maildir, name))
    except BaseException:
        unlink_quietly(tmp)
        raise


def clean_stale(directory: str, before: float) -> int:
    """Unlink regular files in ``directory`` last written before ``before``; returns the count.

    The modification time tells: a file still being written is never old.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.is_file(follow_symlinks=False) and info.st_mtime < before:
            unlink_quietly(entry.path)
            removed += 1
    return removed


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
