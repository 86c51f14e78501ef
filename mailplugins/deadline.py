# -*- test-case-name: tests.unit.test_deadline -*-
"""A deadline for input that must arrive whole, counted from its first byte.

Why not an idle timeout reset on every read: a peer sending one byte a second would then hold
its connection (and its buffer) forever. The protocols start a :class:`Deadline` when a line or
request begins, keep it running while more of it trickles in, and stop it once it is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Deadline:
    """One pending timer, calling ``expired`` if the input it guards is not complete in time."""

    def __init__(self, expired: Callable[[], None]) -> None:
        self._expired = expired
        self._call: Any = None

    @property
    def running(self) -> bool:
        return self._call is not None

    def start(self, clock: Any, seconds: float, *, restart: bool = False) -> None:
        """Run from now (``clock`` has ``callLater``); a running deadline is kept, counting from
        the first byte, unless ``restart`` (a new line or request began)."""
        if self._call is not None:
            if restart:
                self._call.reset(seconds)  # cheaper than a new call: LMTP restarts per command
            return
        self._call = clock.callLater(seconds, self._fire)

    def follow_line(self, clock: Any, seconds: float, *, pending: bool, data: bytes) -> None:
        """For a line protocol after each read of ``data``: stopped when no line is pending;
        a line begun in ``data`` (after a newline in it) gets a fresh deadline, a continued
        line keeps its own."""
        if pending:
            self.start(clock, seconds, restart=b"\n" in data)
        else:
            self.stop()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        self._expired()
