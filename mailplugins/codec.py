# -*- test-case-name: tests.unit.test_codec -*-
"""What every daemon's wire decoder shares: a bounded buffer and an error that sticks.

policyd's request decoder and milterd's frame decoder are fed bytes as they arrive and hand back
complete requests or frames. Bad input is final: once a decoder has raised :class:`CodecError`
it drops what it held and raises the same error on every later call, so a protocol that missed
one exception can never go on parsing from the middle of a broken stream (the connection is to
be closed). Each decoder's own ``_feed`` does the parsing; no Twisted here.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class CodecError(ValueError):
    """The peer sent something that is not the protocol; close the connection."""


class StickyDecoder(Generic[T]):
    """:meth:`feed` bytes, get complete items back; the first :class:`CodecError` sticks.

    Subclasses implement :meth:`_feed` (parse ``self._buffer`` plus ``data``, keep the rest in
    ``self._buffer``) and raise a :class:`CodecError` on bad input.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._error: CodecError | None = None

    @property
    def pending(self) -> bool:
        """True while an item has started but is not complete."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[T]:
        """Decode ``data``; raise :class:`CodecError` on bad input (and on every later call)."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except CodecError as exc:
            self._error = exc
            self._buffer = b""
            raise

    def _feed(self, data: bytes) -> list[T]:
        raise NotImplementedError
