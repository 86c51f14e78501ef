"""deliver's LMTP codec: command parsing, line splitting and the DATA decoder at every split."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deliver.lmtp_codec import (
    CommandError,
    DataDecoder,
    Reply,
    decode_xtext,
    parse_command,
    split_line,
)


def reference_decode(stream: bytes) -> tuple[bytes, bytes] | None:
    """The obvious, slow decoder: (message, leftover), or None without a terminator.

    DATA ends at the first CRLF.CRLF; every line (ended by CRLF or by a lone LF) loses one
    leading dot; then CRLF -> LF.
    """
    data = b"\r\n" + stream
    end = data.find(b"\r\n.\r\n")
    if end < 0:
        return None
    body = data[2 : end + 2]
    lines = re.findall(rb"[^\n]*\n", body)
    unstuffed = b"".join(line[1:] if line.startswith(b".") else line for line in lines)
    return unstuffed.replace(b"\r\n", b"\n"), data[end + 5 :]


def reference_vsize(message: bytes) -> int:
    return len(message) + len(re.findall(rb"(?<!\r)\n", message))


def decode_in_pieces(stream: bytes, cuts: list[int]) -> tuple[bytes, DataDecoder]:
    decoder = DataDecoder()
    out = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        out.append(decoder.feed(stream[previous:cut]))
        previous = cut
    return b"".join(out), decoder


SAMPLES = [
    b".\r\n",
    b"\r\n.\r\n",
    b"Subject: x\r\n\r\nbody\r\n.\r\n",
    b"..leading dot\r\n...two\r\n.\r\n",
    b"a\r\n.\r\nRSET\r\n",
    b"lone\nLF\r\n.\r\n",
    b"lone CR\r here\r\r\n.\r\n",
    b".\rx\r\n.x\r\n.\r\n",
    b"\r\n\r\n.\r\nQUIT\r\n",
    b"x\r\n.\n.\r\n.\r\n",
    b"end without crlf.\r\n.\r\n",
    b"A" * 998 + b"\r\n" + b"." + b"B" * 997 + b"\r\n.\r\n",
    # Dot-stuffing after a lone LF (smtplib.sendmail of a message with LF line ends).
    b"Subject: x\n\n..dot line\n...two\nend\r\n.\r\n",
    b"a\n.\r\n.\r\n",
    b"a\n.\nb\r\n.\r\n",
    b"\n..\r\n\r\n.\r\n",
    b"x\r\r\n..\r\r\n.\r\n",
]


@pytest.mark.parametrize("stream", SAMPLES)
def test_every_single_split_point(stream: bytes) -> None:
    expected, leftover = reference_decode(stream) or (b"", b"")
    for cut in range(len(stream) + 1):
        out, decoder = decode_in_pieces(stream, [cut])
        assert decoder.done, cut
        assert out == expected, cut
        assert decoder.leftover == leftover, cut
        assert decoder.size == len(expected)
        assert decoder.vsize == reference_vsize(expected)


@pytest.mark.parametrize("stream", SAMPLES)
def test_byte_by_byte(stream: bytes) -> None:
    expected, leftover = reference_decode(stream) or (b"", b"")
    out, decoder = decode_in_pieces(stream, list(range(1, len(stream))))
    assert (out, decoder.leftover, decoder.done) == (expected, leftover, True)


def test_every_pair_of_split_points() -> None:
    stream = b"Hi\r\n..dot\r\n.\r\r\nlast\r\n.\r\nNOOP\r\n"
    expected, leftover = reference_decode(stream) or (b"", b"")
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            out, decoder = decode_in_pieces(stream, [first, second])
            assert (out, decoder.leftover) == (expected, leftover), (first, second)


def test_unterminated_stream_is_not_done_and_holds_back_little() -> None:
    decoder = DataDecoder()
    out = decoder.feed(b"line\r\n" * 1000 + b"partial\r")
    assert not decoder.done
    assert out == b"line\n" * 1000 + b"partial"
    out = decoder.feed(b"\n.")
    assert out == b"\n"
    assert not decoder.done
    assert decoder.feed(b"\r\n") == b""
    assert decoder.done


def test_dot_after_a_lone_lf_is_unstuffed_but_never_ends_data() -> None:
    """Issue #15 item 1: the message smtplib.sendmail sends for a text with LF line ends."""
    out, decoder = decode_in_pieces(b"Subject: x\n\n..dot line\n...two\nend\r\n.\r\n", [])
    assert out == b"Subject: x\n\n.dot line\n..two\nend\n"
    assert decoder.done
    # "." alone after a lone LF is a stuffed empty line, not the end (only CRLF.CRLF ends).
    out, decoder = decode_in_pieces(b"a\n.\r\nb\r\n.\r\n", [])
    assert (out, decoder.done) == (b"a\n\nb\n", True)
    out, decoder = decode_in_pieces(b"a\n.\r\n", [])
    assert (out, decoder.done) == (b"a\n", False)  # the CRLF is held back: "." may follow


def test_dot_stuffing_and_terminator_lookalikes() -> None:
    out, decoder = decode_in_pieces(b"..\r\n. \r\n.x\r\n..\r\n\r\n.\r\n", [])
    assert out == b".\n \nx\n.\n\n"
    assert decoder.done


def test_data_after_done_goes_to_leftover() -> None:
    decoder = DataDecoder()
    decoder.feed(b"x\r\n.\r\nRS")
    decoder.feed(b"ET\r\n")
    assert decoder.leftover == b"RSET\r\n"


def test_lone_lf_counts_in_vsize() -> None:
    _out, decoder = decode_in_pieces(b"a\nb\r\nc\r\r\n.\r\n", [])
    # a\n b\n c\r\n -> S=7; the LFs after 'a' and 'b' need a CR, the one after c\r does not.
    assert decoder.size == 7
    assert decoder.vsize == 9


def test_large_stream_memory_is_bounded() -> None:
    decoder = DataDecoder()
    chunk = (b"x" * 76 + b"\r\n") * 800
    total = 0
    for _ in range(200):
        total += len(decoder.feed(chunk))
        assert len(decoder._pending) <= 2
    total += len(decoder.feed(b".\r\n"))
    assert decoder.done
    assert total == decoder.size == 77 * 800 * 200


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\r\n.", b"b\r\n", b"\n.", b"\n.."]),
        max_size=40,
    ),
    st.lists(st.integers(min_value=0, max_value=200), max_size=5),
)
def test_matches_reference_for_random_streams(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    expected, leftover = reference_decode(stream) or (b"", b"")
    usable = sorted(c for c in cuts if c <= len(stream))
    out, decoder = decode_in_pieces(stream, usable)
    assert decoder.done
    assert (out, decoder.leftover) == (expected, leftover)
    assert decoder.vsize == reference_vsize(expected)


# -- commands ------------------------------------------------------------------------------


def test_parse_mail_with_params() -> None:
    command = parse_command(b"MAIL FROM:<a@b.example> SIZE=438 BODY=8BITMIME SMTPUTF8")
    assert command.verb == "MAIL"
    assert command.path == "a@b.example"
    assert command.params == {"SIZE": "438", "BODY": "8BITMIME", "SMTPUTF8": ""}


def test_parse_null_sender_and_lowercase_verb() -> None:
    command = parse_command(b"mail from: <>")
    assert (command.verb, command.path, command.params) == ("MAIL", "", {})


def test_parse_rcpt_with_orcpt_and_quoted_local_part() -> None:
    command = parse_command(b'RCPT TO:<"odd >name"@example.org> ORCPT=rfc822;ok2+2Bfolder@example.com')
    assert command.path == '"odd >name"@example.org'
    assert decode_xtext(command.params["ORCPT"].split(";", 1)[1]) == "ok2+folder@example.com"


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"FOO", 500),
        (b"MAIL TO:<a@b>", 501),
        (b"MAIL FROM:a@b", 501),
        (b"RCPT TO:<a@b", 501),
        (b"RCPT TO:<a@b>junk", 501),
        (b"MAIL FROM:<a@b> SIZE=", 501),
        (b"DATA now", 501),
        (b"NOOP \x01", 500),
        (b"\xff\xfe", 500),
    ],
)
def test_bad_commands(line: bytes, code: int) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(line)
    assert info.value.reply.code == code
    assert info.value.reply.enhanced


def test_xtext_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="xtext"):
        decode_xtext("a+4")
    with pytest.raises(ValueError, match="xtext"):
        decode_xtext("a=b")


def test_split_line_crlf_lf_and_limits() -> None:
    buffer = bytearray(b"LHLO x\r\nNOOP\nRS")
    assert split_line(buffer, 100) == b"LHLO x"
    assert split_line(buffer, 100) == b"NOOP"
    assert split_line(buffer, 100) is None
    assert buffer == b"RS"
    long = bytearray(b"x" * 200 + b"\r\nNOOP\r\n")
    with pytest.raises(OverflowError):
        split_line(long, 100)
    assert split_line(long, 100) == b"NOOP"
    endless = bytearray(b"y" * 300)
    with pytest.raises(OverflowError):
        split_line(endless, 100)


def test_reply_encoding() -> None:
    assert Reply(250, "2.1.5", "OK").encode() == b"250 2.1.5 OK\r\n"
    assert Reply(250, "", "PIPELINING", lines=("host", "SIZE 10")).encode() == (
        b"250-host\r\n250-SIZE 10\r\n250 PIPELINING\r\n"
    )
    assert Reply(550, "5.1.1", "bad\r\nline").encode() == b"550 5.1.1 bad  line\r\n"
