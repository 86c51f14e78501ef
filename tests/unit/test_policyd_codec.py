"""The policy delegation codec: framing, limits, bad input, and real Postfix 3.7 requests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.codec import (
    CodecError,
    LineTooLongError,
    MalformedRequestError,
    PolicyRequest,
    RequestDecoder,
    TooManyAttributesError,
    decode_reply,
    encode_reply,
    encode_request,
)
from tests.unit.test_policyd_fixtures import captured

REAL = captured()
STREAM = b"".join(encode_request(attrs) for attrs in REAL)


def as_dicts(requests: list[PolicyRequest]) -> list[dict[str, str]]:
    return [dict(r.attributes) for r in requests]


EXPECTED = [dict(attrs) for attrs in REAL]


def test_capture_holds_every_state() -> None:
    states = [dict(a)["protocol_state"] for a in REAL]
    assert states == ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE"]
    assert all(len(a) == 29 for a in REAL)


def test_real_requests_in_one_chunk() -> None:
    decoded = RequestDecoder().feed(STREAM)
    assert as_dicts(decoded) == EXPECTED
    assert decoded[3].get("recipient") == "bob@test.example"
    assert decoded[3].get("policy_context") == "rcpt"
    assert decoded[0].get("no_such_attribute", "x") == "x"


def test_real_requests_split_at_every_point() -> None:
    for split in range(len(STREAM) + 1):
        decoder = RequestDecoder()
        first = decoder.feed(STREAM[:split])
        second = decoder.feed(STREAM[split:])
        assert as_dicts(first + second) == EXPECTED, split
        assert len(first) == STREAM[:split].count(b"\n\n"), split
        assert not decoder.pending


def test_every_pair_of_split_points_in_two_requests() -> None:
    stream = STREAM[: STREAM.index(b"\n\n", STREAM.index(b"\n\n") + 2) + 2]
    for a in range(len(stream) + 1):
        for b in range(a, len(stream) + 1, 53):
            decoder = RequestDecoder()
            out = decoder.feed(stream[:a]) + decoder.feed(stream[a:b]) + decoder.feed(stream[b:])
            assert as_dicts(out) == EXPECTED[:2], (a, b)


def test_one_byte_at_a_time() -> None:
    decoder = RequestDecoder()
    out: list[PolicyRequest] = []
    for index in range(len(STREAM)):
        out.extend(decoder.feed(STREAM[index : index + 1]))
        # A request is complete exactly when its terminating empty line arrives.
        assert len(out) == STREAM[: index + 1].count(b"\n\n")
    assert as_dicts(out) == EXPECTED


def test_value_split_on_first_equals_only() -> None:
    data = b"request=smtpd_access_policy\nsender=prvs=1234=bob@example.org\n\n"
    (request,) = RequestDecoder().feed(data)
    assert request.get("sender") == "prvs=1234=bob@example.org"


def test_first_value_wins_and_unknown_names_are_kept() -> None:
    data = (b"request=smtpd_access_policy\nrecipient=a@example.org\nrecipient=b@evil.example\n"
            b"tls_sni=mx.example.org\nempty=\n\n")
    (request,) = RequestDecoder().feed(data)
    assert request.get("recipient") == "a@example.org"
    assert request.get("tls_sni") == "mx.example.org"
    assert request.get("empty", "absent") == ""


def test_crlf_is_tolerated() -> None:
    data = b"request=smtpd_access_policy\r\nprotocol_state=RCPT\r\n\r\n"
    (request,) = RequestDecoder().feed(data)
    assert request.get("protocol_state") == "RCPT"


def test_non_utf8_is_replaced_not_fatal() -> None:
    data = b"request=smtpd_access_policy\nhelo_name=caf\xe9\n\n"
    (request,) = RequestDecoder().feed(data)
    assert request.get("helo_name") == "caf\ufffd"


def test_unterminated_line_over_the_limit_fails_before_its_end() -> None:
    decoder = RequestDecoder(max_line_length=256)
    decoder.feed(b"request=smtpd_access_policy\n" + b"x=" + b"a" * 254)
    with pytest.raises(LineTooLongError):
        decoder.feed(b"a")


def test_line_at_the_limit_is_fine_and_one_more_byte_is_not() -> None:
    line = b"sender=" + b"a" * (256 - 7)
    assert len(line) == 256
    (request,) = RequestDecoder(max_line_length=256).feed(
        b"request=smtpd_access_policy\n" + line + b"\n\n"
    )
    assert len(request.get("sender")) == 249
    with pytest.raises(LineTooLongError):
        RequestDecoder(max_line_length=256).feed(b"request=smtpd_access_policy\n" + line + b"a\n\n")


def test_too_many_attributes() -> None:
    data = b"request=smtpd_access_policy\n" + b"".join(b"a%d=1\n" % i for i in range(8))
    with pytest.raises(TooManyAttributesError):
        RequestDecoder(max_attributes=8).feed(data)
    (request,) = RequestDecoder(max_attributes=9).feed(data + b"\n")
    assert request.get("a7") == "1"


def test_attribute_limit_is_per_request() -> None:
    one = b"request=smtpd_access_policy\n" + b"".join(b"a%d=1\n" % i for i in range(7)) + b"\n"
    assert len(RequestDecoder(max_attributes=8).feed(one * 5)) == 5


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"request=smtpd_access_policy\nnoequals\n\n",
        b"request=smtpd_access_policy\n=value\n\n",
        b"request=smtpd_access_policy\nname=a\0b\n\n",
        b"\n",
        b"protocol_state=RCPT\n\n",
        b"request=something_else\n\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",
    ],
)
def test_garbage_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(MalformedRequestError):
        RequestDecoder().feed(data)


def test_an_error_is_sticky() -> None:
    decoder = RequestDecoder()
    with pytest.raises(CodecError):
        decoder.feed(b"garbage\n")
    with pytest.raises(CodecError):
        decoder.feed(b"request=smtpd_access_policy\n\n")


def test_encode_reply() -> None:
    assert encode_reply("DUNNO") == b"action=DUNNO\n\n"
    assert encode_reply("550 5.1.1 <ü@example.org>: x") == "action=550 5.1.1 <ü@example.org>: x\n\n".encode()
    assert decode_reply(encode_reply("DEFER_IF_PERMIT later")) == "DEFER_IF_PERMIT later"


@pytest.mark.parametrize("action", ["", "DUNNO\n", "DUNNO\naction=OK", "a\rb", "x\0"])
def test_encode_reply_refuses_what_would_desynchronise(action: str) -> None:
    with pytest.raises(ValueError, match="one non-empty line"):
        encode_reply(action)


# -- properties --------------------------------------------------------------------------

NAMES = st.text(st.characters(blacklist_characters="=\n\r\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=20)
VALUES = st.text(st.characters(blacklist_characters="\n\r\0", blacklist_categories=("Cs",)),
                 max_size=60)


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(st.dictionaries(NAMES, VALUES, max_size=10), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=6),
)
def test_any_requests_any_chunking(requests: list[dict[str, str]], cuts: list[int]) -> None:
    wanted = [{"request": "smtpd_access_policy", **{k: v for k, v in r.items() if k != "request"}}
              for r in requests]
    stream = b"".join(encode_request(r) for r in wanted)
    points = sorted({min(c, len(stream)) for c in cuts})
    decoder = RequestDecoder(max_line_length=8192, max_attributes=64)
    out: list[PolicyRequest] = []
    previous = 0
    for point in [*points, len(stream)]:
        out += decoder.feed(stream[previous:point])
        previous = point
    assert as_dicts(out) == wanted


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=400), max_size=8))
def test_garbage_never_crashes_and_stays_bounded(chunks: list[bytes]) -> None:
    decoder = RequestDecoder(max_line_length=256, max_attributes=8)
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except CodecError:
            break
        assert len(decoder._buffer) <= 8 * 257
