"""Property-based tests of authd's codecs: any bytes, any split, bounded buffers, same result."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from authd.dict_codec import DictDecoder
from authd.sasl_codec import AuthServerSession, Drop, ProtocolError, tab_escape, tab_unescape

MAX_LINE = 256
CUTS = st.lists(st.integers(min_value=0), max_size=16)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def run_session(pieces: list[bytes]) -> tuple[list[object], AuthServerSession]:
    session = AuthServerSession(max_line=MAX_LINE, max_requests=8)
    actions: list[object] = []
    for piece in pieces:
        actions.extend(session.receive(piece, now=0.0))
        assert len(session._lines._buffer) <= MAX_LINE  # never more than one line held
    return actions, session


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200), CUTS)
def test_sasl_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    actions, session = run_session(splits(data, cuts))
    drops = [a for a in actions if isinstance(a, Drop)]
    assert len(drops) <= 1
    if drops:
        assert actions[-1] is drops[0] and session.closed
        assert session.receive(b"VERSION\t1\t0\n", now=0.0) == []
    assert len(session.requests) <= 8


@st.composite
def sasl_streams(draw: st.DrawFn) -> bytes:
    lines = [b"VERSION\t1\t0", b"CPID\t4242"]
    for request_id in range(1, draw(st.integers(min_value=0, max_value=5)) + 1):
        user = draw(st.from_regex(r"[a-z]{1,8}@example\.org", fullmatch=True))
        password = draw(TEXT.filter(lambda t: "\0" not in t))
        resp = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        lines.append(f"AUTH\t{request_id}\tPLAIN\tservice=smtp\tnologin\trip=192.0.2.1\tresp={resp}"
                     .encode())
    return b"".join(line + b"\n" for line in lines)


@settings(max_examples=200, deadline=None)
@given(sasl_streams(), CUTS)
def test_sasl_valid_streams_decode_the_same_however_split(stream: bytes, cuts: list[int]) -> None:
    whole, _ = run_session([stream])
    pieces, _ = run_session(splits(stream, cuts))
    assert pieces == whole
    assert not any(isinstance(a, Drop) for a in whole)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200), CUTS)
def test_dict_arbitrary_bytes_raise_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    decoder = DictDecoder(max_line=MAX_LINE)
    for piece in splits(data, cuts):
        try:
            decoder.feed(piece)
        except ProtocolError:
            return  # the protocol drops the connection
        assert len(decoder._lines._buffer) <= MAX_LINE


@st.composite
def dict_streams(draw: st.DrawFn) -> bytes:
    lines = ["H3\t2\t0\t\tauth"]
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        user = draw(st.from_regex(r"[a-z]{1,8}@example\.org", fullmatch=True))
        kind = draw(st.sampled_from(["passdb", "userdb"]))
        lines.append(f"Lshared/{kind}/{user}\t{user}")
    if draw(st.booleans()):
        lines.append("I0\t0\tshared/userdb/\t*")
    return "".join(line + "\n" for line in lines).encode()


@settings(max_examples=200, deadline=None)
@given(dict_streams(), CUTS)
def test_dict_valid_streams_decode_the_same_however_split(stream: bytes, cuts: list[int]) -> None:
    whole = DictDecoder().feed(stream)
    decoder = DictDecoder()
    pieces = [command for piece in splits(stream, cuts) for command in decoder.feed(piece)]
    assert pieces == whole


@given(TEXT)
def test_tab_escaping_round_trips(text: str) -> None:
    escaped = tab_escape(text)
    assert not any(c in escaped for c in "\t\n\r\0")
    assert tab_unescape(escaped) == text


FIELD_NAMES = st.sampled_from(["user", "password", "service", "rip", "secured", "other", ""])
ALLOWED_STATUSES = {200, 400, 403, 404, 405, 413, 423, 503}


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(FIELD_NAMES, st.one_of(TEXT, st.binary(max_size=40).map(repr)), max_size=6),
    st.binary(max_size=300),
    st.booleans(),
    CUTS,
)
def test_http_verify_any_parameters_get_a_proper_status(
    fields: dict[str, str], raw_body: bytes, use_raw: bool, cuts: list[int]
) -> None:
    from urllib.parse import urlencode

    from tests.unit.test_authd_http import connect
    from tests.unit.test_authd_verify import Rig

    rig = Rig(failure_delay="0s")
    channel, transport = connect(rig)
    body = raw_body if use_raw else urlencode(fields).encode()
    request = (
        b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    for piece in splits(request, cuts):
        channel.dataReceived(piece)  # type: ignore[attr-defined]
    rig.clock.advance(10)
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 "), response[:80]
    assert int(response.split(b" ", 2)[1]) in ALLOWED_STATUSES
