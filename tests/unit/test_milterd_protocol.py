"""milterd's Twisted protocol: one write per read, ordering while a decision waits, bad input."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from milterd import codec
from milterd.codec import MtaEncoder as Mta
from milterd.protocol import MilterFactory
from tests.support.milter_fakes import FakeChecks, FakeSigner, milterd_config


class CountingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def connect(checks: FakeChecks | None = None, *, unix: bool = False,
            **config: Any) -> tuple[Any, CountingTransport, Clock]:
    """A protocol on a fake transport: as over TCP (every command answered) unless ``unix``."""
    clock = Clock()
    factory = MilterFactory(checks or FakeChecks(), milterd_config(**config), clock)
    protocol = factory.buildProtocol(None)
    transport = CountingTransport()
    protocol.makeConnection(transport)  # no socket: taken for a unix one
    if not unix:
        protocol.session.extra_protocol = 0
    return protocol, transport, clock


def codes(transport: StringTransport) -> list[str]:
    replies, rest = codec.decode_replies(transport.value())
    assert rest == b""
    return [r.code for r in replies]


START = Mta.optneg() + Mta.macro("C", {"j": "mx"}) + Mta.connect("c", "198.51.100.1") + Mta.helo("c")
MESSAGE = (Mta.mail("<b@example.net>") + Mta.DATA + Mta.header("From", " b@example.net") + Mta.EOH
           + Mta.body(b"hello\r\n") + Mta.EOM)


def test_a_whole_conversation_in_one_read_is_answered_in_one_write() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(START + MESSAGE)
    assert codes(transport) == ["O", "c", "c", "c", "c", "c", "c", "c", "i", "c"]
    assert transport.writes == 1
    protocol.dataReceived(Mta.QUIT)
    assert transport.disconnecting


def test_on_a_unix_socket_postfix_need_not_wait_for_continue() -> None:
    protocol, transport, _ = connect(unix=True)
    protocol.dataReceived(START + MESSAGE)
    replies, _ = codec.decode_replies(transport.value())
    offer = replies[0].payload
    assert int.from_bytes(offer[8:12], "big") & codec.NO_REPLY == codec.NO_REPLY
    # Only end of headers and end of message are answered (and the negotiation).
    assert [r.code for r in replies] == ["O", "c", "i", "c"]
    assert transport.writes == 1


class TcpTransport(CountingTransport):
    """Looks like a TCP socket transport to milterd (a real, unconnected AF_INET socket)."""

    def __init__(self) -> None:
        super().__init__()
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def getHandle(self) -> socket.socket:
        return self.socket


def test_over_tcp_no_reply_events_follow_no_reply_tcp() -> None:
    for configured, expected in ((False, 0), (True, codec.NO_REPLY)):  # default: True
        factory = MilterFactory(FakeChecks(), milterd_config(no_reply_tcp=configured), Clock())
        protocol = factory.buildProtocol(None)
        transport = TcpTransport()
        protocol.makeConnection(transport)
        assert protocol.session.extra_protocol == expected
        assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        transport.socket.close()


def test_byte_by_byte_gives_the_same_replies() -> None:
    protocol, transport, _ = connect()
    for index in range(len(START + MESSAGE)):
        protocol.dataReceived((START + MESSAGE)[index:index + 1])
    assert codes(transport) == ["O", "c", "c", "c", "c", "c", "c", "c", "i", "c"]


def test_commands_behind_a_pending_decision_wait_and_reading_pauses() -> None:
    held: Deferred[Any] = Deferred()
    checks = FakeChecks(keys={"example.org"}, hold={"keys": held})
    protocol, transport, _ = connect(checks)
    trusted = Mta.optneg() + Mta.connect("c", "192.0.2.5") + Mta.helo("c")  # in mynetworks
    protocol.dataReceived(trusted + Mta.mail("<a@example.org>") + Mta.header("From", " a@example.org")
                          + Mta.macro("N", {"i": "Q1"}) + Mta.EOH + Mta.body(b"x") + Mta.EOM)
    assert codes(transport)[-1] == "c"  # answered up to the header; EOH pending
    before = len(codes(transport))
    assert transport.producerState == "paused"
    signer = FakeSigner("example.org", [])
    checks.signers.append(signer)
    held.callback(signer)
    assert codes(transport)[before:] == ["c", "c", "i", "i", "c"]
    assert transport.producerState == "producing"
    assert bytes(signer.body) == b"x"


def test_malformed_input_closes_without_a_reply() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(codec.frame("Z"))
    assert transport.value() == b"" and transport.disconnecting


def test_a_failed_negotiation_closes() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(Mta.optneg(actions=codec.SMFIF_ADDHDRS))
    assert transport.value() == b"" and transport.disconnecting


def test_an_oversized_frame_closes() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(b"\x00\x10\x00\x00B")
    assert transport.disconnecting


def test_idle_and_partial_frame_timers() -> None:
    protocol, transport, clock = connect(idle_timeout=100, frame_timeout=5)
    protocol.dataReceived(START)
    clock.advance(99)
    assert not transport.disconnecting
    protocol.dataReceived(Mta.mail("<a@b.example>")[:3])
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    protocol, transport, clock = connect(idle_timeout=100)
    clock.advance(100)
    assert transport.disconnecting


def test_quit_new_connection_starts_a_fresh_session() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(START + Mta.QUIT_NC + Mta.connect("d", "198.51.100.2"))
    assert protocol.session.client_address == "198.51.100.2"
    assert not transport.disconnecting


def test_connection_lost_cancels_pending_spf() -> None:
    held: Deferred[Any] = Deferred()
    protocol, _, _ = connect(FakeChecks(hold={"spf": held}))
    protocol.dataReceived(START + Mta.mail("<a@b.example>"))
    protocol.connectionLost()
    assert held.called  # cancelled
