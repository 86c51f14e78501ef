"""Property-based tests of milterd's protocol and session: any bytes, any order of commands."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from milterd import codec
from milterd.codec import MtaEncoder as Mta
from milterd.protocol import MilterFactory
from tests.support.milter_fakes import FakeChecks, milterd_config

CUTS = st.lists(st.integers(min_value=0), max_size=12)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=20)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def run(pieces: list[bytes], unix: bool) -> tuple[Any, StringTransport]:
    checks = FakeChecks(owned={("a@example.org", "a@example.org")}, keys={"example.org"})
    protocol = MilterFactory(checks, milterd_config(max_frame=70_000), Clock()).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    if not unix:
        protocol.session.extra_protocol = 0
    for piece in pieces:
        protocol.dataReceived(piece)  # must never raise
    return protocol, transport


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=800), CUTS, st.booleans())
def test_arbitrary_bytes_never_crash(data: bytes, cuts: list[int], unix: bool) -> None:
    _protocol, transport = run(splits(Mta.optneg() + data, cuts), unix)
    _replies, rest = codec.decode_replies(transport.value())
    assert rest == b""  # whatever was written is whole replies


COMMANDS = st.sampled_from([
    Mta.connect("c", "198.51.100.1"), Mta.connect("c", "192.0.2.1"), Mta.helo("h"),
    Mta.macro("M", {"{auth_authen}": "a@example.org"}), Mta.mail("<a@example.org>"),
    Mta.mail("a@example.org"), Mta.rcpt("<b@x>"), Mta.DATA, Mta.header("From", " a@example.org"),
    Mta.header("From", " b@bank.example"), Mta.header("Authentication-Results", " mx.example.test; x"),
    Mta.header("Subject", " a\n\tb"), Mta.EOH, Mta.body(b"x\r\n"), Mta.EOM, Mta.ABORT, Mta.QUIT_NC,
])


@settings(max_examples=300, deadline=None)
@given(st.lists(COMMANDS, max_size=30), CUTS, st.booleans())
def test_commands_in_any_order_get_well_formed_answers(commands: list[bytes], cuts: list[int],
                                                      unix: bool) -> None:
    data = Mta.optneg() + b"".join(commands)
    _protocol, transport = run(splits(data, cuts), unix)
    replies, rest = codec.decode_replies(transport.value())
    assert rest == b""
    assert replies and replies[0].code == "O"
    assert all(r.code in "cairtymhpqs" for r in replies[1:])
    assert not transport.disconnecting  # nothing here is malformed
