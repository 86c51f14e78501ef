# -*- test-case-name: tests.unit.test_deliver_maildir -*-
"""Maildir++ names as Dovecot reads them: folder directories (modified UTF-7) and file names.

Pure functions and a counter: no disk access.
"""

from __future__ import annotations

import base64
import itertools
import os
import threading
import time
from collections.abc import Callable

__all__ = ["NameGenerator", "encode_mutf7", "folder_for_detail", "folder_path", "maildir_name"]


def encode_mutf7(name: str) -> str:
    """IMAP modified UTF-7 (RFC 3501 5.1.3), the on-disk folder name encoding Dovecot uses."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def folder_for_detail(detail: str) -> str | None:
    """The folder a ``+detail`` names, or None (INBOX) when it is not a safe folder name.

    Maildir++ uses ``.`` as the hierarchy separator, so ``lists.python`` is ``lists`` ->
    ``python``. Refused: empty names or components, ``/``, control characters, anything starting
    with ``.`` or ``~``, ``INBOX`` in any case (that is the Maildir itself), over 200 characters.
    """
    if not detail or len(detail) > 200:
        return None
    if any(ord(c) < 32 or ord(c) == 127 or c in "/\\*%" for c in detail):
        return None
    if detail[0] in ".~" or detail.endswith(".") or ".." in detail:
        return None
    if detail.split(".", 1)[0].upper() == "INBOX":
        return None
    return detail


def folder_path(maildir: str, folder: str | None) -> str:
    """Directory of ``folder`` (None = INBOX) in the Maildir++ layout rooted at ``maildir``."""
    if folder is None:
        return maildir
    return os.path.join(maildir, "." + encode_mutf7(folder))


def _host_part(hostname: str) -> str:
    return hostname.replace("/", "\\057").replace(":", "\\072")


def maildir_name(base: str, size: int, vsize: int) -> str:
    return f"{base},S={size},W={vsize}"


class NameGenerator:
    """Unique names ``<sec>.M<usec>P<pid>Q<n>.<host>`` (Dovecot's form plus a sequence number).

    ``clock`` returns seconds since the epoch (injected for tests); the pid is read at every
    call, not once at import, so a forked child never reuses its parent's names.
    """

    #: One sequence per process, shared by every generator (a reload makes a new one).
    _counter = itertools.count(1)
    _lock = threading.Lock()

    def __init__(self, hostname: str, clock: Callable[[], float] = time.time) -> None:
        self.host = _host_part(hostname)
        self._clock = clock

    def next(self) -> str:
        now = self._clock()
        seconds = int(now)
        micros = min(999_999, round((now - seconds) * 1_000_000))
        with NameGenerator._lock:
            sequence = next(NameGenerator._counter)
        return f"{seconds}.M{micros}P{os.getpid()}Q{sequence}.{self.host}"
