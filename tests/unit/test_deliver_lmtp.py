"""deliver's LMTP protocol: sequencing, pipelining with slow lookups, limits, timeouts.

The service is a fake whose lookups and deliveries are Deferreds the test fires by hand, so
reply order under pipelining can be checked exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from deliver.envelope import Envelope, Recipient
from deliver.lmtp import LMTPServer
from deliver.lmtp_codec import Reply
from deliver.maildir import Body
from deliver.metrics import DeliverMetrics
from deliver.spool import Spool
from mailplugins.config import parse_config
from mailplugins.metrics import DaemonMetrics
from tests.support.sync import SyncPool


@dataclass
class FakeService:
    settings: Any
    lookups: list[tuple[str, Deferred[Any]]] = field(default_factory=list)
    deliveries: list[tuple[Envelope, Body, Deferred[list[Reply]]]] = field(default_factory=list)
    metrics: DeliverMetrics = field(default_factory=lambda: DeliverMetrics(DaemonMetrics("deliver")))
    spool_dir: str = "/tmp"

    def check_recipient(self, path: str, original: str | None, size: int | None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.lookups.append((path, d))
        return d

    def new_spool(self, envelope: Envelope | None = None) -> Spool:
        return Spool(self.spool_dir, self.settings.memory_spool_limit, SyncPool())

    def deliver(self, envelope: Envelope, body: Body) -> Deferred[list[Reply]]:
        d: Deferred[list[Reply]] = Deferred()
        self.deliveries.append((envelope, body, d))
        return d

    def too_big(self, envelope: Envelope) -> list[Reply]:
        return [Reply(552, "5.3.4", f"<{r.path}> Message too big") for r in envelope.recipients]

    def spool_failed(self, envelope: Envelope, error: BaseException) -> list[Reply]:
        return [Reply(451, "4.3.0", "spool") for _ in envelope.recipients]


def make(**deliver: Any) -> tuple[LMTPServer, StringTransport, FakeService, Clock]:
    section = {"listen": "tcp:0", "hostname": "mx.test", "max_message_size": 2048,
               "idle_timeout": 60, "max_line_length": 512, **deliver}
    config = parse_config({"database": {"url": "sqlite://"},
                           "mail": {"location": "/tmp/x/%d/%n", "uid": 0, "gid": 0}, "deliver": section})
    service = FakeService(config.deliver)
    clock = Clock()
    protocol = LMTPServer(service, clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, service, clock


def take(transport: StringTransport) -> list[str]:
    lines: list[str] = transport.value().decode().split("\r\n")[:-1]
    transport.clear()
    return lines


def accept(service: FakeService, index: int, path: str) -> None:
    service.lookups[index][1].callback(Recipient(path, None, ()))


def test_greeting_and_lhlo_capabilities() -> None:
    protocol, transport, _service, _clock = make()
    assert take(transport) == ["220 mx.test LMTP mailplugins deliver ready"]
    protocol.dataReceived(b"LHLO client.example\r\n")
    assert take(transport) == [
        "250-mx.test", "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-SMTPUTF8", "250-SIZE 2048",
        "250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE", "250 PIPELINING",
    ]


def test_helo_and_ehlo_are_refused_and_order_is_enforced() -> None:
    protocol, transport, _service, _clock = make()
    take(transport)
    protocol.dataReceived(b"HELO x\r\nEHLO x\r\nMAIL FROM:<a@b>\r\nLHLO x\r\nRCPT TO:<a@b>\r\nDATA\r\n"
                          b"MAIL FROM:<a@b>\r\nDATA\r\nMAIL FROM:<c@d>\r\n")
    codes = [line[:9] for line in take(transport) if not line.startswith("250-")]
    assert codes == ["500 5.5.1", "500 5.5.1", "503 5.5.1", "250 PIPEL", "503 5.5.1", "503 5.5.1",
                     "250 2.1.0", "503 5.5.1", "503 5.5.1"]


def test_pipelined_envelope_with_slow_lookups_replies_in_order() -> None:
    protocol, transport, service, _clock = make()
    protocol.dataReceived(b"LHLO x\r\n")
    take(transport)
    protocol.dataReceived(
        b"MAIL FROM:<s@o.example> SIZE=100\r\nRCPT TO:<a@x>\r\nRCPT TO:<nouser@x>\r\n"
        b"RCPT TO:<b@x>\r\nDATA\r\n"
    )
    assert take(transport) == ["250 2.1.0 <s@o.example> Sender OK"]
    assert [p for p, _ in service.lookups] == ["a@x"]
    assert transport.producerState == "paused"
    accept(service, 0, "a@x")
    assert take(transport) == ["250 2.1.5 <a@x> OK"]
    assert [p for p, _ in service.lookups] == ["a@x", "nouser@x"]
    service.lookups[1][1].callback(Reply(550, "5.1.1", "<nouser@x> User doesn't exist"))
    assert take(transport) == ["550 5.1.1 <nouser@x> User doesn't exist"]
    accept(service, 2, "b@x")
    assert take(transport) == ["250 2.1.5 <b@x> OK", "354 Start mail input; end with <CRLF>.<CRLF>"]
    assert transport.producerState == "producing"
    protocol.dataReceived(b"Subject: hi\r\n\r\n..dotted\r\n.\r\nNOOP\r\n")
    assert take(transport) == []
    (envelope, body, done) = service.deliveries[0]
    assert [r.path for r in envelope.recipients] == ["a@x", "b@x"]
    assert body.data == b"Subject: hi\n\n.dotted\n"
    assert (body.size, body.bare_newlines) == (21, 3)
    done.callback([Reply(250, "2.0.0", "<a@x> Saved"), Reply(452, "4.2.2", "<b@x> full")])
    assert take(transport) == ["250 2.0.0 <a@x> Saved", "452 4.2.2 <b@x> full", "250 2.0.0 OK"]


def test_duplicate_recipients_each_get_a_reply() -> None:
    protocol, transport, service, _clock = make()
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n")
    accept(service, 0, "a@x")
    accept(service, 1, "a@x")
    protocol.dataReceived(b".\r\n")
    envelope, body, done = service.deliveries[0]
    assert len(envelope.recipients) == 2
    assert body.size == 0
    take(transport)
    done.callback([Reply(250, "2.0.0", "ok1"), Reply(250, "2.0.0", "ok2")])
    assert take(transport) == ["250 2.0.0 ok1", "250 2.0.0 ok2"]


def test_declared_size_over_limit_is_refused_at_mail() -> None:
    protocol, transport, _service, _clock = make()
    protocol.dataReceived(b"LHLO x\r\n")
    take(transport)
    protocol.dataReceived(b"MAIL FROM:<a@b> SIZE=4096\r\nMAIL FROM:<a@b> BODY=BINARYMIME\r\n"
                          b"MAIL FROM:<a@b> AUTH=<>\r\n")
    assert take(transport) == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "555 5.5.4 Unsupported BODY type BINARYMIME",
        "555 5.5.4 Unsupported parameter AUTH",
    ]


def test_oversized_data_is_drained_and_refused_per_recipient(tmp_path: Any) -> None:
    protocol, transport, service, _clock = make()
    service.spool_dir = str(tmp_path)
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    accept(service, 0, "a@x")
    accept(service, 1, "b@x")
    take(transport)
    for _ in range(100):
        protocol.dataReceived(b"y" * 98 + b"\r\n")
    protocol.dataReceived(b".\r\nNOOP\r\n")
    assert take(transport) == [
        "552 5.3.4 <a@x> Message too big", "552 5.3.4 <b@x> Message too big", "250 2.0.0 OK",
    ]
    assert service.deliveries == []


def test_large_message_goes_to_a_spool_file(tmp_path: Any) -> None:
    protocol, _transport, service, _clock = make(max_message_size="1M", memory_spool_limit=4096)
    service.spool_dir = str(tmp_path)
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\nDATA\r\n")
    accept(service, 0, "a@x")
    line = b"z" * 76 + b"\r\n"
    for _ in range(1000):
        protocol.dataReceived(line)
    protocol.dataReceived(b".\r\n")
    _envelope, body, _done = service.deliveries[0]
    assert body.spool is not None
    assert body.size == 77 * 1000
    body.spool.seek(0)
    assert body.spool.read() == (b"z" * 76 + b"\n") * 1000
    body.close()


def test_idle_timeout_closes_with_421() -> None:
    protocol, transport, _service, clock = make()
    take(transport)
    clock.advance(59)
    protocol.dataReceived(b"NOOP\r\n")
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(2)
    assert take(transport) == ["250 2.0.0 OK", "421 4.4.2 mx.test Idle timeout, closing connection"]
    assert transport.disconnecting


def test_a_command_sent_one_byte_a_second_times_out() -> None:
    protocol, transport, _service, clock = make()
    take(transport)
    for byte in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP\r\n"[:61]:
        protocol.dataReceived(bytes([byte]))
        clock.advance(1)
        if transport.disconnecting:
            break
    assert take(transport) == ["421 4.4.2 mx.test Timeout: client too slow, closing connection"]
    assert transport.disconnecting
    assert clock.seconds() == 60  # idle_timeout after the greeting, not after the last byte


def test_each_complete_command_gives_a_fresh_period() -> None:
    protocol, transport, _service, clock = make()
    take(transport)
    for _ in range(5):
        clock.advance(50)
        protocol.dataReceived(b"NOOP\r\n")
    assert take(transport) == ["250 2.0.0 OK"] * 5
    assert not transport.disconnecting


def data_session(**deliver: Any) -> tuple[LMTPServer, StringTransport, FakeService, Clock]:
    protocol, transport, service, clock = make(**deliver)
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\n")
    accept(service, 0, "a@x")
    protocol.dataReceived(b"DATA\r\n")
    take(transport)
    return protocol, transport, service, clock


def test_data_trickling_below_min_data_rate_times_out() -> None:
    protocol, transport, _service, clock = data_session(max_message_size="1M", min_data_rate=500)
    for _ in range(70):
        protocol.dataReceived(b"x" * 100)  # 100 bytes/s: under 500
        clock.advance(1)
        if transport.disconnecting:
            break
    assert take(transport) == ["421 4.4.2 mx.test Timeout: client too slow, closing connection"]
    assert clock.seconds() == 60


def test_data_at_min_data_rate_keeps_the_connection() -> None:
    protocol, transport, _service, clock = data_session(max_message_size="1M", min_data_rate=500)
    for _ in range(200):
        protocol.dataReceived(b"x" * 600 + b"\r\n")
        clock.advance(1)
    assert not transport.disconnecting
    protocol.dataReceived(b".\r\n")
    assert not transport.disconnecting


def test_no_timeout_while_waiting_for_a_lookup() -> None:
    protocol, transport, service, clock = make()
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\n")
    clock.advance(600)
    assert not transport.disconnecting
    accept(service, 0, "a@x")
    clock.advance(61)
    assert transport.disconnecting


def test_long_line_is_refused_and_session_continues() -> None:
    protocol, transport, _service, _clock = make()
    take(transport)
    protocol.dataReceived(b"NOOP " + b"x" * 1000)
    protocol.dataReceived(b"x" * 1000 + b"\r\nNOOP\r\n")
    assert take(transport) == ["500 5.5.2 Line too long", "250 2.0.0 OK"]


def test_quit_and_eof_without_quit() -> None:
    protocol, transport, _service, _clock = make()
    take(transport)
    protocol.dataReceived(b"QUIT\r\nNOOP\r\n")
    assert take(transport) == ["221 2.0.0 mx.test Bye"]
    assert transport.disconnecting
    other, _transport2, service2, _ = make()
    other.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\nDATA\r\npartial")
    accept(service2, 0, "a@x")
    other.connectionLost(None)
    assert service2.deliveries == []


def test_vrfy_rset_and_many_transactions() -> None:
    protocol, transport, service, _clock = make()
    protocol.dataReceived(b"LHLO x\r\nVRFY a\r\n")
    assert take(transport)[-1] == "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    for index in range(3):
        protocol.dataReceived(b"RSET\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\nDATA\r\n")
        accept(service, index, "a@x")
        protocol.dataReceived(b"m\r\n.\r\n")
        service.deliveries[index][2].callback([Reply(250, "2.0.0", "saved")])
    assert take(transport).count("250 2.0.0 saved") == 3
    assert len(service.deliveries) == 3


def test_internal_error_in_delivery_gives_451_per_recipient() -> None:
    protocol, transport, service, _clock = make()
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    accept(service, 0, "a@x")
    accept(service, 1, "b@x")
    protocol.dataReceived(b"m\r\n.\r\n")
    take(transport)
    service.deliveries[0][2].errback(RuntimeError("boom"))
    assert take(transport) == ["451 4.3.0 Local error in processing"] * 2


def test_dsn_is_advertised_only_when_configured() -> None:
    protocol, transport, service, _clock = make(advertise_dsn=True)
    protocol.dataReceived(b"LHLO x\r\n")
    assert "250-DSN" in take(transport)
    protocol.dataReceived(b"MAIL FROM:<a@b> RET=HDRS ENVID=abc\r\n"
                          b"RCPT TO:<a@x> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bb@x\r\n")
    assert take(transport) == ["250 2.1.0 <a@b> Sender OK"]
    assert service.lookups[0][0] == "a@x"
    plain, transport2, _service2, _ = make()
    plain.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b> RET=HDRS\r\n")
    lines = take(transport2)
    assert "250-DSN" not in lines
    assert lines[-1] == "555 5.5.4 Unsupported parameter RET"


def test_spool_write_failure_answers_each_recipient(tmp_path: Any) -> None:
    protocol, transport, service, _clock = make(max_message_size="1M", memory_spool_limit=4096)
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    service.spool_dir = str(blocker / "spool")
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
    accept(service, 0, "a@x")
    accept(service, 1, "b@x")
    take(transport)
    for _ in range(200):
        protocol.dataReceived(b"q" * 98 + b"\r\n")
    protocol.dataReceived(b".\r\nNOOP\r\n")
    assert take(transport) == ["451 4.3.0 spool", "451 4.3.0 spool", "250 2.0.0 OK"]
    assert service.deliveries == []


WORDS = [b"LHLO x", b"MAIL FROM:<a@b>", b"MAIL FROM:<>", b"RCPT TO:<a@x>", b"DATA", b"RSET", b"NOOP",
         b"VRFY", b".", b"..", b"", b"HELO", b"MAIL FROM:<a@b> SIZE=99999999999", b"\xff", b"x" * 600,
         b"RCPT TO:<a@x> ORCPT=rfc822;+ZZ", b"MAIL FROM:<a@b> BODY=8BITMIME SMTPUTF8"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=30), st.sampled_from([b"\r\n", b"\n"]),
       st.integers(min_value=1, max_value=50))
def test_random_sessions_never_raise(words: list[bytes], eol: bytes, step: int) -> None:
    protocol, transport, service, _clock = make()
    stream = b"".join(word + eol for word in words)
    for start in range(0, len(stream), step):
        protocol.dataReceived(stream[start : start + step])
        for index, (path, d) in enumerate(service.lookups):
            if not d.called:
                d.callback(Recipient(path, None, ()) if index % 2 else Reply(550, "5.1.1", "no"))
        for envelope, _body, done in service.deliveries:
            if not done.called:
                done.callback([Reply(250, "2.0.0", "ok")] * len(envelope.recipients))
    for line in transport.value().split(b"\r\n")[:-1]:
        assert line[:3].isdigit(), line


def test_unexpected_error_in_a_command_is_451(monkeypatch: Any) -> None:
    protocol, transport, _service, _clock = make()
    take(transport)

    def broken(command: Any) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(protocol, "do_NOOP", broken)
    protocol.dataReceived(b"NOOP\r\nRSET\r\n")
    assert take(transport) == ["451 4.3.0 Local error in processing", "250 2.0.0 OK"]


def test_xforward_ident_reaches_the_envelope_for_one_transaction() -> None:
    protocol, transport, service, _clock = make()
    take(transport)
    protocol.dataReceived(b"LHLO x\r\nXFORWARD NAME=mx.example ADDR=192.0.2.1\r\n"
                          b"XFORWARD PROTO=ESMTP HELO=h IDENT=4Abc12+2Bx SOURCE=REMOTE\r\n"
                          b"MAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\n")
    accept(service, 0, "a@x")
    protocol.dataReceived(b"DATA\r\nhi\r\n.\r\n")
    assert take(transport)[-4:] == ["250 2.0.0 Ok", "250 2.1.0 <a@b> Sender OK", "250 2.1.5 <a@x> OK",
                                    "354 Start mail input; end with <CRLF>.<CRLF>"]
    envelope, _body, done = service.deliveries[0]
    assert envelope.ident == "192.168.1.1/4Abc12+x"  # xtext-decoded, qualified by the client host
    done.callback([Reply(250, "2.0.0", "<a@x> Saved")])
    protocol.dataReceived(b"MAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\n")
    accept(service, 1, "a@x")
    protocol.dataReceived(b"DATA\r\nhi\r\n.\r\n")
    assert service.deliveries[1][0].ident is None  # XFORWARD held for one transaction only


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"XFORWARD\r\n", "501 5.5.4 Syntax: XFORWARD attribute=value ..."),
        (b"XFORWARD COLOR=red\r\n", "501 5.5.4 Bad XFORWARD attribute name: COLOR"),
        (b"XFORWARD IDENT=a+zz\r\n", "501 5.5.4 Bad XFORWARD attribute value for IDENT"),
        (b"MAIL FROM:<a@b>\r\nXFORWARD IDENT=x\r\n", "503 5.5.1 Error: MAIL transaction in progress"),
    ],
)
def test_xforward_errors(line: bytes, reply: str) -> None:
    protocol, transport, _service, _clock = make()
    protocol.dataReceived(b"LHLO x\r\n")
    take(transport)
    protocol.dataReceived(line)
    assert take(transport)[-1] == reply


def test_xforward_before_lhlo_is_503() -> None:
    protocol, transport, _service, _clock = make()
    take(transport)
    protocol.dataReceived(b"XFORWARD IDENT=x\r\n")
    assert take(transport) == ["503 5.5.1 Send LHLO first"]


@pytest.mark.parametrize("param", ["NOTIFY=NEVER", "NOTIFY=BOGUS", "ORCPT=rfc822;a@x"])
def test_dsn_parameters_without_dsn_advertised_are_555(param: str) -> None:
    """Issue #15 item 6, RFC 5321 4.1.1.11: DSN is not advertised, so its parameters are not
    accepted (RET= and ENVID= on MAIL already got 555)."""
    protocol, transport, service, _clock = make()
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\n" + f"RCPT TO:<a@x> {param}\r\n".encode())
    key = param.split("=")[0]
    assert take(transport)[-1] == f"555 5.5.4 Unsupported parameter {key} (no DSN)"
    assert service.lookups == []


def test_notify_is_checked_when_dsn_is_advertised() -> None:
    protocol, transport, service, _clock = make(advertise_dsn=True)
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x> NOTIFY=BOGUS\r\n"
                          b"RCPT TO:<a@x> NOTIFY=NEVER,SUCCESS\r\nRCPT TO:<b@x> NOTIFY=never\r\n")
    assert take(transport)[-2:] == ["501 5.5.4 Invalid NOTIFY parameter"] * 2
    assert [path for path, _ in service.lookups] == ["b@x"]


def test_utf8_addresses_need_smtputf8_on_mail() -> None:
    """Issue #15 item 7, RFC 6531 3.4: 553 5.6.7 without SMTPUTF8; with it they work."""
    protocol, transport, service, _clock = make()
    protocol.dataReceived("LHLO x\r\nMAIL FROM:<jö@b.example>\r\nMAIL FROM:<a@b>\r\n"
                          "RCPT TO:<jö@x>\r\nRSET\r\n".encode())
    lines = take(transport)
    assert "250-SMTPUTF8" in lines
    assert lines[-4:] == ["553 5.6.7 UTF-8 in an address needs MAIL FROM:<...> SMTPUTF8",
                          "250 2.1.0 <a@b> Sender OK",
                          "553 5.6.7 UTF-8 in an address needs MAIL FROM:<...> SMTPUTF8",
                          "250 2.0.0 OK"]
    assert service.lookups == []
    protocol.dataReceived("MAIL FROM:<jö@b.example> SMTPUTF8\r\nRCPT TO:<jö@x>\r\n".encode())
    assert take(transport) == ["250 2.1.0 <jö@b.example> Sender OK"]
    assert [path for path, _ in service.lookups] == ["jö@x"]


def test_mail_records_the_transaction_time_and_client() -> None:
    protocol, _transport, service, clock = make()
    clock.advance(5)
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@x>\r\n")
    accept(service, 0, "a@x")
    protocol.dataReceived(b"DATA\r\nm\r\n.\r\n")
    envelope = service.deliveries[0][0]
    assert envelope.timestamp == 5
    assert envelope.client_ip == "192.168.1.1"  # StringTransport's peer
    assert envelope.helo == "x"


def test_lhlo_without_a_name_has_no_enhanced_code_yet() -> None:
    """ENHANCEDSTATUSCODES is in force only after a successful LHLO (Dovecot answers alike)."""
    protocol, transport, _service, _clock = make()
    take(transport)
    protocol.dataReceived(b"LHLO\r\nFROB\r\n")
    assert take(transport) == ["501 Syntax: LHLO hostname", "500 5.5.1 Command unrecognized"]


def test_a_client_waiting_for_each_reply_is_never_paused_but_early_input_is_held() -> None:
    """The transport is paused only once input arrives while a command waits: a client that
    waits for each reply costs no pause and resume, and what it sends early stays unread."""
    protocol, transport, service, _clock = make()
    protocol.dataReceived(b"LHLO x\r\nMAIL FROM:<s@o.example>\r\n")
    take(transport)
    protocol.dataReceived(b"RCPT TO:<a@x>\r\n")
    assert transport.producerState == "producing"  # waiting for the lookup, nothing more sent
    protocol.dataReceived(b"RCPT TO:<b@x>\r\n")
    assert transport.producerState == "paused"
    assert [p for p, _ in service.lookups] == ["a@x"]
    accept(service, 0, "a@x")
    assert take(transport) == ["250 2.1.5 <a@x> OK"]
    assert [p for p, _ in service.lookups] == ["a@x", "b@x"]
    accept(service, 1, "b@x")
    assert take(transport) == ["250 2.1.5 <b@x> OK"]
    assert transport.producerState == "producing"
