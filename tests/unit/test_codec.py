"""The decoder base policyd's and milterd's codecs share: buffering and an error that sticks."""

from __future__ import annotations

import pytest

from mailplugins.codec import CodecError, StickyDecoder
from milterd import codec as milter_codec
from policyd import codec as policy_codec


class Lines(StickyDecoder[bytes]):
    """Lines ended by LF; a line starting with ``!`` is bad input."""

    def _feed(self, data: bytes) -> list[bytes]:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if any(line.startswith(b"!") for line in lines):
            raise CodecError("bad line")
        return lines


def test_items_come_back_whole_and_pending_says_one_has_started() -> None:
    decoder = Lines()
    assert decoder.feed(b"a\nb") == [b"a"]
    assert decoder.pending
    assert decoder.feed(b"c\n") == [b"bc"]
    assert not decoder.pending


def test_the_first_error_sticks_and_drops_what_was_held() -> None:
    decoder = Lines()
    with pytest.raises(CodecError, match="bad line") as first:
        decoder.feed(b"!x\nheld")
    assert not decoder.pending
    with pytest.raises(CodecError) as again:
        decoder.feed(b"fine\n")
    assert again.value is first.value


def test_both_daemons_codecs_are_sticky_decoders_with_their_own_errors() -> None:
    assert isinstance(milter_codec.MilterDecoder(), StickyDecoder)
    assert isinstance(policy_codec.RequestDecoder(), StickyDecoder)
    assert issubclass(milter_codec.CodecError, CodecError)
    assert issubclass(policy_codec.CodecError, CodecError)
    assert not issubclass(milter_codec.CodecError, policy_codec.CodecError)
