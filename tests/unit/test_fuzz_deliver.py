"""Property-based tests of the LMTP codec: any bytes, any split, bounded memory, same result."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from deliver.lmtp_codec import CommandError, DataDecoder, LineTooLong, parse_command, split_line
from tests.unit.test_deliver_codec import reference_decode, reference_vsize

LINES = st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                 max_size=30)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


@settings(max_examples=300, deadline=None)
@given(LINES, st.lists(st.integers(min_value=0), max_size=12), st.binary(max_size=20))
def test_valid_data_decodes_the_same_however_split(
    lines: list[bytes], cuts: list[int], after: bytes
) -> None:
    wire = stuffed(lines) + b".\r\n" + after
    expected = b"".join(line + b"\n" for line in lines)
    decoder = DataDecoder()
    out = b"".join(decoder.feed(piece) for piece in splits(wire, cuts))
    assert decoder.done
    assert out == expected
    assert decoder.leftover == after
    assert decoder.size == len(expected)
    assert decoder.vsize == len(expected) + expected.count(b"\n")


#: Messages made of the bytes that matter to decoding: CR, LF and dot in any order.
LINE_END_SOUP = st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b".", b"\r\n\r\n"]),
                         max_size=60).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(LINE_END_SOUP, st.lists(st.integers(min_value=0), max_size=12))
def test_any_mix_of_line_ends_decodes_and_counts_as_the_reference(
    body: bytes, cuts: list[int]
) -> None:
    """Bare CRs, bare LFs, CR CR LF, blank lines, split anywhere: the same bytes and sizes as
    the slow reference (the fast path for all-CRLF input must never be taken wrongly)."""
    wire = b"\r\n" + body + b"\r\n.\r\n"
    expected, _ = reference_decode(wire) or (b"", b"")
    decoder = DataDecoder()
    out = b"".join(decoder.feed(piece) for piece in splits(wire, cuts))
    assert decoder.done
    assert out == expected
    assert decoder.size == len(expected)
    assert decoder.vsize == reference_vsize(expected)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=20))
def test_arbitrary_bytes_never_raise_and_hold_back_little(data: bytes, cuts: list[int]) -> None:
    decoder = DataDecoder()
    total = 0
    for piece in splits(data, cuts):
        total += len(decoder.feed(piece))
        assert len(decoder._pending) <= 2  # memory does not grow with the message
    assert total <= len(data)
    if decoder.done:
        assert data.endswith(decoder.leftover)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=12),
       st.integers(min_value=16, max_value=200))
def test_command_lines_are_bounded(data: bytes, cuts: list[int], limit: int) -> None:
    buffer = bytearray()
    for piece in splits(data, cuts):
        buffer += piece
        while True:
            try:
                line = split_line(buffer, limit)
            except LineTooLong:
                continue
            if line is None:
                break
            assert len(line) <= limit
            try:
                parse_command(line)
            except CommandError as exc:
                message = str(exc)
                assert message
        assert len(buffer) <= limit + 1


@given(st.binary(max_size=300))
def test_parse_command_only_raises_command_error(line: bytes) -> None:
    try:
        command = parse_command(line)
    except CommandError:
        return
    assert command.verb.isupper()
