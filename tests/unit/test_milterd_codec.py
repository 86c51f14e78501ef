"""milterd's milter codec: frames, negotiation, macros, body chunks, replies, limits, any split."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milterd import codec
from milterd.codec import MtaEncoder as Mta

# What Postfix 3.7 sends for one authenticated message (reference: milter-dkim.md).
CONVERSATION = b"".join([
    Mta.optneg(),
    Mta.macro("C", {"j": "mx.example.test", "{daemon_name}": "ORIGINATING", "v": "Postfix 3.7.11"}),
    Mta.connect("client.example.net", "192.0.2.7", 41234),
    Mta.helo("client.example.net"),
    Mta.macro("M", {"{auth_type}": "PLAIN", "{auth_authen}": "alice@example.org"}),
    Mta.mail("<alice@example.org>", "SIZE=1234"),
    Mta.macro("T", {"i": "4ABC123"}),
    Mta.DATA,
    Mta.header("From", " Alice <alice@example.org>"),
    Mta.header("Subject", " a folded\n\tsubject"),
    Mta.EOH,
    Mta.body(b"hello\r\n" * 20000),
    Mta.EOM,
    Mta.ABORT,
    Mta.QUIT,
])


def decode_all(data: bytes, **limits: int) -> list[codec.Command]:
    return codec.MilterDecoder(**limits).feed(data)


def test_a_postfix_conversation_decodes() -> None:
    commands = decode_all(CONVERSATION)
    kinds = [type(c).__name__ for c in commands]
    assert kinds == ["OptNeg", "Macros", "Connect", "Helo", "Macros", "Mail", "Macros", "Data",
                     "Header", "Header", "EndOfHeaders", "Body", "Body", "Body", "EndOfMessage",
                     "Abort", "Quit"]
    assert commands[0] == codec.OptNeg(6, 0x1FF, 0x1FFFFF)
    assert commands[2] == codec.Connect("client.example.net", "4", 41234, "192.0.2.7")
    assert commands[4] == codec.Macros("M", {"{auth_type}": "PLAIN", "{auth_authen}": "alice@example.org"})
    assert commands[5] == codec.Mail("<alice@example.org>", ("SIZE=1234",))
    assert commands[9] == codec.Header("Subject", " a folded\n\tsubject")
    bodies = [c for c in commands if isinstance(c, codec.Body)]
    assert [len(b.chunk) for b in bodies] == [65535, 65535, 140000 - 2 * 65535]


def test_unix_and_ipv6_connect() -> None:
    assert decode_all(Mta.connect("localhost", "", family="U")) == [codec.Connect("localhost", "U", 0, "")]
    ipv6 = codec.Connect("h", "6", 25, "2001:db8::1")
    assert decode_all(Mta.connect("h", "2001:db8::1", 25, "6")) == [ipv6]


def test_header_bytes_survive_as_surrogates() -> None:
    (header,) = decode_all(codec.frame("L", b"Subject\0 caf\xe9\0"))
    assert isinstance(header, codec.Header)
    assert header.value.encode("utf-8", "surrogateescape") == b" caf\xe9"


@pytest.mark.parametrize(("data", "message"), [
    (struct.pack("!I", 0), "length 0"),
    (struct.pack("!I", 300_000) + b"B", "300000 bytes"),
    (codec.frame("Z"), "unknown command"),
    (codec.frame("L", b"Subject\0value"), "not NUL-terminated"),
    (codec.frame("L", b"\0value\0"), "name and a value"),
    (codec.frame("C", b"host\0"), "no family"),
    (codec.frame("C", b"host\x004"), "no port"),
    (codec.frame("C", b"host\0X\0\x19addr\0"), "unknown family"),
    (codec.frame("O", b"\0\0\0\6"), "12 bytes"),
    (codec.frame("D", b""), "no stage"),
    (codec.frame("D", b"Mname\0"), "without a value"),
    (codec.frame("M", b""), "without an address"),
    (codec.frame("N", b"x"), "no payload"),
    (codec.frame("H", b"a\0b\0"), "expected 1 strings"),
])
def test_malformed_frames_are_refused_for_good(data: bytes, message: str) -> None:
    decoder = codec.MilterDecoder()
    with pytest.raises(codec.CodecError, match=message):
        decoder.feed(data)
    with pytest.raises(codec.CodecError):
        decoder.feed(Mta.optneg())  # nothing after an error


def test_too_many_macros() -> None:
    frame = Mta.macro("C", {f"m{i}": "v" for i in range(20)})
    with pytest.raises(codec.CodecError, match="more than 10"):
        decode_all(frame, max_macros=10)
    assert len(decode_all(frame, max_macros=20)) == 1


def test_an_oversized_length_is_refused_before_its_bytes_arrive() -> None:
    decoder = codec.MilterDecoder(max_frame=70_000)
    with pytest.raises(codec.FrameTooLongError):
        decoder.feed(struct.pack("!I", 70_001))


def test_negotiation_answers_a_subset() -> None:
    answer = codec.negotiate(codec.OptNeg(6, 0x1FF, 0x1FFFFF))
    assert answer.version == 6
    assert answer.actions == codec.SMFIF_ADDHDRS | codec.SMFIF_CHGHDRS
    assert answer.protocol & codec.SMFIP_HDR_LEADSPC
    assert not answer.protocol & codec.SMFIP_NODATA  # the DATA event stays (no TCP stall)
    assert not answer.protocol & (codec.SMFIP_NR_HDR | codec.SMFIP_NR_BODY)
    encoded = codec.encode_optneg(answer)
    assert encoded == struct.pack("!IcIII", 13, b"O", 6, answer.actions, answer.protocol)


@pytest.mark.parametrize("offer", [
    codec.OptNeg(6, codec.SMFIF_ADDHDRS, 0x1FFFFF),   # cannot delete headers
    codec.OptNeg(2, 0x1FF, 0x1FFFFF) ,
    codec.OptNeg(6, 0x1FF, 0xFFFFF),                  # no SMFIP_HDR_LEADSPC
    codec.OptNeg(1, 0x1FF, 0x1FFFFF),
])
def test_negotiation_refuses_what_we_cannot_work_with(offer: codec.OptNeg) -> None:
    if offer.version == 2:
        assert codec.negotiate(offer).version == 2
        return
    with pytest.raises(codec.NegotiationError):
        codec.negotiate(offer)


def test_replies() -> None:
    assert codec.CONTINUE == b"\0\0\0\x01c"
    assert codec.ACCEPT == b"\0\0\0\x01a"
    assert codec.TEMPFAIL == b"\0\0\0\x01t"
    reply = codec.reply_code("550", "5.7.1 100% not yours")
    assert reply == codec.frame("y", b"550 5.7.1 100%% not yours\0")
    inserted = codec.insert_header(0, "DKIM-Signature", " v=1;\r\n\tb=abc")
    assert inserted == codec.frame("i", b"\0\0\0\0DKIM-Signature\0 v=1;\n\tb=abc\0")
    assert codec.change_header(2, "Authentication-Results", "") == codec.frame(
        "m", b"\0\0\0\x02Authentication-Results\0\0")
    assert codec.add_header("X-A", " b") == codec.frame("h", b"X-A\0 b\0")
    replies, rest = codec.decode_replies(codec.CONTINUE + inserted + b"\0\0")
    assert [r.code for r in replies] == ["c", "i"] and rest == b"\0\0"


@pytest.mark.parametrize(("code", "text"), [("250", "ok"), ("55", "x"), ("550", "a\r\nb")])
def test_bad_reply_codes_are_programming_errors(code: str, text: str) -> None:
    with pytest.raises(ValueError):
        codec.reply_code(code, text)


def test_change_header_index_is_one_based() -> None:
    with pytest.raises(ValueError):
        codec.change_header(0, "X", "")


def test_every_split_point_gives_the_same_commands() -> None:
    data = b"".join([Mta.optneg(), Mta.macro("C", {"j": "mx"}), Mta.connect("h", "192.0.2.1"),
                     Mta.helo("h"), Mta.mail("<a@b>"), Mta.header("From", " a@b"), Mta.EOH,
                     Mta.body(b"x\r\n"), Mta.EOM, Mta.QUIT])
    whole = decode_all(data)
    for cut in range(len(data) + 1):
        decoder = codec.MilterDecoder()
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert got == whole, cut
        assert not decoder.pending


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


CUTS = st.lists(st.integers(min_value=0), max_size=16)
MAX_FRAME = 70_000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), CUTS)
def test_arbitrary_bytes_raise_only_codec_errors_and_stay_bounded(data: bytes, cuts: list[int]) -> None:
    decoder = codec.MilterDecoder(max_frame=MAX_FRAME, max_macros=8)
    for piece in splits(data, cuts):
        try:
            decoder.feed(piece)
        except codec.CodecError:
            return
        assert len(decoder._buffer) <= MAX_FRAME + 4


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), CUTS)
def test_arbitrary_payloads_in_valid_frames(payload: bytes, cuts: list[int]) -> None:
    for kind in "ODCHMRLBETNAQKU":
        data = codec.frame(kind, payload)
        decoder = codec.MilterDecoder(max_frame=MAX_FRAME)
        try:
            got = [c for piece in splits(data, cuts) for c in decoder.feed(piece)]
        except codec.CodecError:
            continue
        assert len(got) == 1


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=30)


@st.composite
def conversations(draw: st.DrawFn) -> bytes:
    parts = [Mta.optneg(), Mta.connect(draw(TEXT), "192.0.2.1"), Mta.helo(draw(TEXT))]
    for _ in range(draw(st.integers(0, 3))):
        parts.append(Mta.macro("M", {"{auth_authen}": draw(TEXT)}))
        parts.append(Mta.mail(draw(TEXT)))
        for _ in range(draw(st.integers(0, 4))):
            parts.append(Mta.header(draw(TEXT.filter(bool)), draw(TEXT)))
        parts.append(Mta.EOH)
        parts.append(Mta.body(draw(st.binary(max_size=300))))
        parts.append(Mta.EOM)
    parts.append(Mta.QUIT)
    return b"".join(parts)


@settings(max_examples=200, deadline=None)
@given(conversations(), CUTS)
def test_valid_conversations_decode_the_same_however_split(data: bytes, cuts: list[int]) -> None:
    whole = decode_all(data)
    decoder = codec.MilterDecoder()
    pieces = [c for piece in splits(data, cuts) for c in decoder.feed(piece)]
    assert pieces == whole
