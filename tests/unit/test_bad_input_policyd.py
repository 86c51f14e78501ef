"""Bad-input catalogue for policyd: every case with the exact bytes written (or none) and whether
the connection is closed.

The Postfix policy protocol has no error reply: a server that cannot read a request closes the
connection and Postfix applies its ``default_action``. So every malformed case below asserts
"nothing written, connection closed", and every case Postfix could really produce (odd bytes
inside a well-formed request) asserts the exact ``action=`` line. Timers run on a task.Clock.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from mailplugins.connections import LimitedFactory
from policyd.codec import encode_request
from policyd.protocol import PolicyFactory, PolicyProtocol
from tests.unit.test_policyd_fixtures import Harness
from tests.unit.test_policyd_protocol import RELAY, UNKNOWN, connect, wire
from tests.unit.test_policyd_service import ManualRun

DUNNO = b"action=DUNNO\n\n"


def request(**attrs: bytes) -> bytes:
    """A minimal RCPT request from raw byte values (so values may hold any byte)."""
    values = {
        b"request": b"smtpd_access_policy",
        b"protocol_state": b"RCPT",
        b"client_address": b"203.0.113.5",
        b"sender": b"someone@elsewhere.example",
        b"recipient": b"alice@example.org",
    }
    values.update({name.encode(): value for name, value in attrs.items()})
    return b"".join(name + b"=" + value + b"\n" for name, value in values.items()) + b"\n"


def closed_silently(protocol: PolicyProtocol, transport: StringTransport) -> bool:
    """Closed with nothing written and no timer left."""
    return (
        transport.value() == b""
        and transport.disconnecting
        and not protocol._idle.running
        and not protocol._deadline.running
    )


class Warnings:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> Warnings:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def reasons(self) -> list[str]:
        return [
            str(e.get("reason", "")) for e in self.events if e.get("log_level") == LogLevel.warn
        ]


# -- malformed requests: closed without a reply -------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # Overlong line, its end not even arrived: refused once past max_line_length.
        (b"request=smtpd_access_policy\nsender=" + b"a" * 9000, "line longer than 8192 bytes"),
        # Overlong line, complete, inside a complete request.
        (request(sender=b"a" * 9000), "line longer than 8192 bytes"),
        (request(sender=b"a\0b@example.org"), "NUL byte in attribute line"),
        (b"\0" * 16 + b"\n\n", "NUL byte in attribute line"),
        # Unknown "commands": SMTP, HTTP, a TLS ClientHello, a bare word.
        (b"HELO client.example\r\n", "attribute line without name=value"),
        (b"GET / HTTP/1.0\r\n\r\n", "attribute line without name=value"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", "attribute line without name=value"),
        (b"quit\n", "attribute line without name=value"),
        (b"=value\nrequest=smtpd_access_policy\n\n", "attribute line without name=value"),
        (b"\n", "empty request"),
        (b"\r\n", "empty request"),
        (b"request=junk\nprotocol_state=RCPT\n\n", "unknown request type"),
        (b"protocol_state=RCPT\nrecipient=alice@example.org\n\n", "missing request attribute"),
        (b"".join(b"x%d=y\n" % i for i in range(130)), "more than 128 attributes in one request"),
    ],
    ids=[
        "overlong-partial", "overlong-complete", "nul-in-value", "nul-only", "smtp-command",
        "http-request", "tls-hello", "bare-word", "empty-name", "empty-request",
        "empty-request-crlf", "unknown-request-type", "no-request-attribute", "too-many-attributes",
    ],
)
def test_malformed_input_is_closed_without_a_reply(data: bytes, reason: str) -> None:
    with Warnings() as warnings:
        protocol, transport = connect(Harness())
        protocol.dataReceived(data)
    assert closed_silently(protocol, transport)
    assert not protocol._decoder.pending  # the bad bytes are not kept
    assert warnings.reasons() == [reason]


def test_malformed_input_byte_by_byte() -> None:
    """A bad first line is refused as soon as it ends; a later one when its request ends (the
    request is parsed whole: the hot path), never later."""
    for data, end in (
        (b"no equals sign\nrequest=smtpd_access_policy\n\n", b"\nrequest"),
        (b"request=smtpd_access_policy\nno equals sign\nmore=bytes\n\n", b"\n\n"),
    ):
        protocol, transport = connect(Harness())
        for index in range(len(data)):
            protocol.dataReceived(data[index : index + 1])
            if transport.disconnecting:
                break
        assert closed_silently(protocol, transport)
        assert index == data.index(end) + (1 if end == b"\n\n" else 0)


def test_nothing_is_read_after_the_close() -> None:
    protocol, transport = connect(Harness())
    protocol.dataReceived(b"junk\n")
    protocol.dataReceived(wire(recipient="x@other.example"))
    assert closed_silently(protocol, transport)


# -- odd bytes Postfix may pass on: answered normally -------------------------------------


@pytest.mark.parametrize(
    ("attrs", "reply"),
    [
        # Invalid UTF-8 is replaced (U+FFFD): such a local part names no mailbox...
        ({"recipient": b"\xffalice@example.org"}, UNKNOWN),
        # ... and such a domain is not ours.
        ({"recipient": b"alice@\xffexample.org"}, RELAY),
        ({"sender": b"\xff\xfe@elsewhere.example"}, DUNNO),
        ({"helo_name": b"\xc3\x28", "client_name": b"\xed\xa0\x80"}, DUNNO),
        # Unknown attributes and protocol states never break a request.
        ({"x_future_attribute": b"\xff"}, DUNNO),
        ({"protocol_state": b"BOGUS"}, DUNNO),
        # Values holding "=" (BATV) and a repeated attribute (the first value wins).
        ({"sender": b"prvs=1234=bounce@elsewhere.example"}, DUNNO),
    ],
    ids=[
        "invalid-utf8-local-part", "invalid-utf8-domain", "invalid-utf8-sender",
        "invalid-utf8-names", "unknown-attribute", "unknown-protocol-state", "equals-in-value",
    ],
)
def test_odd_bytes_in_a_wellformed_request_get_an_answer(
    attrs: dict[str, bytes], reply: bytes
) -> None:
    protocol, transport = connect(Harness())
    protocol.dataReceived(request(**attrs))
    assert transport.value() == reply
    assert not transport.disconnecting


def test_repeated_attribute_keeps_its_first_value() -> None:
    protocol, transport = connect(Harness())
    data = request(recipient=b"nobody@example.org")
    protocol.dataReceived(data[:-1] + b"recipient=alice@example.org\n\n")
    assert transport.value() == UNKNOWN


def test_crlf_line_ends_are_accepted() -> None:
    protocol, transport = connect(Harness())
    protocol.dataReceived(request().replace(b"\n", b"\r\n"))
    assert transport.value() == DUNNO
    assert not transport.disconnecting


# -- garbage pipelined after a valid request ----------------------------------------------


def test_garbage_line_in_the_same_read_drops_the_valid_request_too() -> None:
    """Postfix never sends a second request before the first reply, so a read that holds a
    request and garbage is not Postfix: nothing is answered."""
    protocol, transport = connect(Harness())
    protocol.dataReceived(wire(recipient="x@other.example") + b"GARBAGE\n")
    assert closed_silently(protocol, transport)


def test_garbage_line_in_a_later_read_closes_after_the_answer() -> None:
    protocol, transport = connect(Harness())
    protocol.dataReceived(wire(recipient="x@other.example"))
    protocol.dataReceived(b"GARBAGE\n")
    assert transport.value() == RELAY
    assert transport.disconnecting


def test_unterminated_garbage_after_a_request_times_out() -> None:
    h = Harness(request_timeout="10s")
    protocol, transport = connect(h)
    protocol.dataReceived(wire(recipient="x@other.example") + b"GARBAGE")
    assert transport.value() == RELAY
    h.clock.advance(9.9)
    assert not transport.disconnecting
    h.clock.advance(0.1)
    assert transport.disconnecting
    assert transport.value() == RELAY


def test_valid_pipelined_requests_are_all_answered_in_order() -> None:
    protocol, transport = connect(Harness())
    protocol.dataReceived(wire(recipient="nobody@example.org") + wire(recipient="x@other.example"))
    assert transport.value() == UNKNOWN + RELAY
    assert not transport.disconnecting


# -- half-closed and lost connections -----------------------------------------------------


def test_connection_lost_mid_request_leaves_no_timer() -> None:
    h = Harness()
    protocol, transport = connect(h)
    protocol.dataReceived(wire()[:40])
    protocol.connectionLost(Failure(ConnectionError("peer closed its side")))
    assert transport.value() == b""
    assert h.clock.getDelayedCalls() == []


def test_connection_lost_while_deciding_writes_nothing_later() -> None:
    run = ManualRun()
    h = Harness(run=run)
    protocol, transport = connect(h)
    protocol.dataReceived(wire(recipient="alice@example.org") + wire()[:20])
    protocol.connectionLost(Failure(ConnectionError("peer closed its side")))
    run.complete_all()
    assert transport.value() == b""
    assert h.clock.getDelayedCalls() == []


def test_half_close_after_a_request_answers_it_then_closes() -> None:
    """``printf 'request=...\\n\\n' | nc -N -U socket``: the answer, then the close."""
    protocol, transport = connect(Harness())
    protocol.dataReceived(wire(recipient="x@other.example") + wire(recipient="nobody@example.org"))
    protocol.readConnectionLost()
    assert transport.value() == RELAY + UNKNOWN
    assert transport.disconnecting


def test_half_close_while_deciding_answers_first() -> None:
    run = ManualRun()
    h = Harness(run=run)
    protocol, transport = connect(h)
    protocol.dataReceived(wire(recipient="nobody@example.org"))
    protocol.readConnectionLost()
    assert transport.value() == b""
    assert not transport.disconnecting
    run.complete_all()
    assert transport.value() == UNKNOWN
    assert transport.disconnecting
    assert h.clock.getDelayedCalls() == []


def test_half_close_while_deciding_answers_every_queued_request() -> None:
    run = ManualRun()
    h = Harness(run=run)
    protocol, transport = connect(h)
    cached = wire(recipient="x@other.example")
    protocol.dataReceived(cached)
    run.complete_all()  # other.example is now known not to be ours: answered without waiting
    assert transport.value() == RELAY
    protocol.dataReceived(wire(recipient="nobody@example.org") + cached + cached)
    protocol.readConnectionLost()
    run.complete_all()
    assert transport.value() == RELAY + UNKNOWN + RELAY + RELAY
    assert transport.disconnecting


def test_half_close_mid_request_drops_it() -> None:
    h = Harness()
    protocol, transport = connect(h)
    protocol.dataReceived(wire()[:40])
    protocol.readConnectionLost()
    assert closed_silently(protocol, transport)
    assert h.clock.getDelayedCalls() == []


def test_half_close_passes_through_the_connection_limit_wrapper() -> None:
    h = Harness()
    factory = PolicyFactory(h.service, h.config, h.clock)
    limited = LimitedFactory(cast(IProtocolFactory, factory), listener="policyd.listen",
                             maximum=10, metrics=h.metrics)
    wrapper = limited.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    wrapper.makeConnection(transport)
    assert IHalfCloseableProtocol.providedBy(wrapper)
    wrapper.dataReceived(wire(recipient="x@other.example"))
    IHalfCloseableProtocol(wrapper).readConnectionLost()  # type: ignore[misc]
    assert transport.value() == RELAY
    assert transport.disconnecting
    # A protocol without half-close support (deliver's) keeps Twisted's close at EOF.
    plain = LimitedFactory(cast(IProtocolFactory, Factory.forProtocol(Protocol)),
                           listener="other", maximum=10, metrics=h.metrics)
    other = plain.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
    other.makeConnection(StringTransport())
    assert not IHalfCloseableProtocol.providedBy(other)


# -- idle and slow peers ------------------------------------------------------------------


def test_idle_connection_closes_after_idle_timeout_without_a_reply() -> None:
    h = Harness(idle_timeout="1100s")
    protocol, transport = connect(h)
    h.clock.advance(1099.9)
    assert not transport.disconnecting
    h.clock.advance(0.1)
    assert closed_silently(protocol, transport)


def test_one_byte_a_second_is_closed_at_the_request_timeout() -> None:
    """Every byte used to postpone the idle timeout: a slow sender held its connection forever."""
    h = Harness(request_timeout="10s", idle_timeout="1100s")
    protocol, transport = connect(h)
    data = wire()
    with Warnings() as warnings:
        sent = 0
        while not transport.disconnecting:
            protocol.dataReceived(data[sent : sent + 1])
            sent += 1
            h.clock.advance(1)
    assert sent == 10  # the first byte at t=0, the deadline at t=10
    assert closed_silently(protocol, transport)
    assert len(warnings.events) == 1
    assert warnings.events[0]["log_format"].startswith("{peer}: request not complete")


def test_request_timeout_counts_from_the_first_byte_of_each_request() -> None:
    h = Harness(request_timeout="10s")
    protocol, transport = connect(h)
    first = wire(recipient="x@other.example")
    protocol.dataReceived(first[:30])
    h.clock.advance(9)
    protocol.dataReceived(first[30:])  # complete at t=9: answered, the deadline stops
    assert transport.value() == RELAY
    second = wire(recipient="nobody@example.org")
    h.clock.advance(5)
    protocol.dataReceived(second[:30])  # the next request's deadline starts here (t=14)
    h.clock.advance(9.9)
    protocol.dataReceived(second[30:])
    assert transport.value() == RELAY + UNKNOWN
    assert not transport.disconnecting


def test_request_behind_a_slow_decision_is_timed_from_the_answer() -> None:
    """While a request is decided the connection is not read, so its successor cannot finish:
    its time starts when the answer leaves."""
    run = ManualRun()
    h = Harness(run=run, request_timeout="10s")
    protocol, transport = connect(h)
    protocol.dataReceived(wire(recipient="nobody@example.org") + b"request=smtpd")
    h.clock.advance(1.5)
    run.complete_all()
    assert transport.value() == UNKNOWN
    h.clock.advance(9.9)
    assert not transport.disconnecting
    h.clock.advance(0.1)
    assert transport.disconnecting
    assert transport.value() == UNKNOWN


def test_request_timeout_is_read_from_config_and_bounded() -> None:
    assert Harness().config.request_timeout == 10.0
    assert Harness(request_timeout="250ms").config.request_timeout == 0.25
    from mailplugins.config.fields import ConfigError

    with pytest.raises(ConfigError, match="request_timeout"):
        Harness(request_timeout="5m")


def test_byte_by_byte_within_the_deadline_is_served() -> None:
    h = Harness(request_timeout="10s")
    protocol, transport = connect(h)
    data = encode_request({"request": "smtpd_access_policy", "protocol_state": "CONNECT",
                           "client_address": "192.0.2.1"})
    for index in range(len(data)):
        protocol.dataReceived(data[index : index + 1])
        h.clock.advance(0.1)
    assert transport.value() == DUNNO
    assert not transport.disconnecting
