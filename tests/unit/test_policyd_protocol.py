"""The Twisted protocol: order, flow control, closing on bad input, idle timeout."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from mailplugins.connections import LimitedFactory
from policyd.codec import encode_request
from policyd.protocol import PolicyFactory, PolicyProtocol
from tests.unit.test_policyd_fixtures import Harness, captured, rcpt
from tests.unit.test_policyd_service import ManualRun

UNKNOWN = b"action=550 5.1.1 User unknown\n\n"
RELAY = b"action=554 5.7.1 Relay access denied\n\n"


def wire(**attrs: str) -> bytes:
    return encode_request(dict(rcpt(**attrs).attributes))


def connect(h: Harness) -> tuple[PolicyProtocol, StringTransport]:
    factory = PolicyFactory(h.service, h.config, h.clock)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000))
    protocol.makeConnection(transport)
    return protocol, transport


def test_nothing_is_sent_unasked() -> None:
    h = Harness()
    _, transport = connect(h)
    assert transport.value() == b""
    h.clock.advance(1000)
    assert transport.value() == b""
    assert not transport.disconnecting


def test_several_requests_in_one_write_are_answered_in_order() -> None:
    h = Harness()
    protocol, transport = connect(h)
    protocol.dataReceived(wire(recipient="nobody@example.org") + wire(recipient="alice@example.org")
                          + wire(recipient="x@other.example"))
    assert transport.value() == UNKNOWN + b"action=DUNNO\n\n" + RELAY
    assert not transport.disconnecting


def test_every_captured_request_byte_by_byte() -> None:
    h = Harness()
    protocol, transport = connect(h)
    stream = b"".join(encode_request(attrs) for attrs in captured())
    for index in range(len(stream)):
        protocol.dataReceived(stream[index : index + 1])
    # The capture came from 127.0.0.1, inside mynetworks: relaying is Postfix's to decide.
    assert transport.value() == b"action=DUNNO\n\n" * 6


def test_slow_decisions_keep_order_and_pause_the_peer() -> None:
    run = ManualRun()
    h = Harness(run=run)
    protocol, transport = connect(h)
    protocol.dataReceived(wire(recipient="nobody@example.org") + wire(recipient="x@other.example"))
    assert transport.value() == b""
    assert transport.producerState == "paused"
    run.complete_all()
    assert transport.value() == UNKNOWN + RELAY
    assert transport.producerState == "producing"


def test_request_split_across_a_slow_decision() -> None:
    run = ManualRun()
    h = Harness(run=run)
    protocol, transport = connect(h)
    second = wire(recipient="x@other.example")
    protocol.dataReceived(wire(recipient="nobody@example.org") + second[:10])
    protocol.dataReceived(second[10:])
    run.complete_all()
    assert transport.value() == UNKNOWN + RELAY


def test_malformed_input_closes_without_reply() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness()
        protocol, transport = connect(h)
        protocol.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        assert transport.value() == b""
        assert transport.disconnecting
        protocol.dataReceived(wire())  # nothing more after the error
        assert transport.value() == b""
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert any("attribute line without name=value" in e.get("reason", "") for e in warnings)


def test_earlier_replies_are_kept_when_a_later_request_is_bad() -> None:
    h = Harness()
    protocol, transport = connect(h)
    protocol.dataReceived(wire(recipient="x@other.example"))
    protocol.dataReceived(b"junk\n\n")
    assert transport.value() == RELAY
    assert transport.disconnecting


def test_oversize_line_closes_without_buffering_it() -> None:
    h = Harness(max_line_length=256)
    protocol, transport = connect(h)
    protocol.dataReceived(b"request=smtpd_access_policy\nsender=" + b"a" * 300)
    assert transport.disconnecting
    assert transport.value() == b""
    assert protocol._decoder._buffer == b""


def test_too_many_attributes_closes() -> None:
    h = Harness(max_attributes=8)
    protocol, transport = connect(h)
    protocol.dataReceived(wire())
    assert transport.disconnecting
    assert transport.value() == b""


def test_idle_timeout_closes_and_activity_postpones_it() -> None:
    h = Harness(idle_timeout="1100s")
    protocol, transport = connect(h)
    h.clock.advance(1000)
    protocol.dataReceived(wire(recipient="alice@example.org"))
    h.clock.advance(1000)
    assert not transport.disconnecting
    h.clock.advance(101)
    assert transport.disconnecting


def test_connection_lost_while_deciding() -> None:
    run = ManualRun()
    h = Harness(run=run)
    protocol, transport = connect(h)
    protocol.dataReceived(wire(recipient="alice@example.org") + wire(recipient="x@other.example"))
    protocol.connectionLost(Failure(ConnectionError("gone")))
    run.complete_all()
    assert transport.value() == b""
    assert h.clock.getDelayedCalls() == []


def test_limited_factory_wraps_the_protocol() -> None:
    h = Harness()
    factory = PolicyFactory(h.service, h.config, h.clock)
    limited = LimitedFactory(cast(IProtocolFactory, factory), listener="policyd.listen",
                             maximum=1, metrics=h.metrics)
    first = limited.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    first.makeConnection(transport)
    first.dataReceived(wire(recipient="x@other.example"))
    assert transport.value() == RELAY
    assert h.metrics.registry.get_sample_value(
        "mailplugins_policyd_open_connections", {"listener": "policyd.listen"}
    ) == 1
    refused = limited.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
    other = StringTransport()
    refused.makeConnection(other)
    assert other.disconnecting and other.value() == b""
