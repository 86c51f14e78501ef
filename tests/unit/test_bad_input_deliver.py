"""Bad-input catalogue for deliver's LMTP server: every case with its exact reply lines.

Unlike the policy, auth-client and dict protocols, SMTP/LMTP has error replies, so a bad
command is answered (``500 5.5.2`` and friends) and the session goes on; only the 50th error
closes it. The DATA stream is binary-safe: NUL bytes and invalid UTF-8 are stored as sent.
Slow senders (one byte a second) are the subject of the lead's command timeout, not tested here.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from deliver.lmtp import LMTPServer
from deliver.lmtp_codec import Reply
from tests.unit.test_deliver_lmtp import FakeService, accept, make, take

ENVELOPE = b"LHLO client.example\r\nMAIL FROM:<s@o.example>\r\nRCPT TO:<a@x>\r\nDATA\r\n"


def session() -> tuple[LMTPServer, StringTransport, FakeService]:
    protocol, transport, service, _clock = make()
    protocol.dataReceived(b"LHLO client.example\r\n")
    take(transport)
    return protocol, transport, service


def in_data() -> tuple[LMTPServer, StringTransport, FakeService]:
    """A session that has answered 354 for one accepted recipient."""
    protocol, transport, service, _clock = make()
    protocol.dataReceived(ENVELOPE)
    accept(service, 0, "a@x")
    lines = take(transport)
    assert lines[-1] == "354 Start mail input; end with <CRLF>.<CRLF>"
    return protocol, transport, service


@pytest.mark.parametrize(
    ("data", "replies"),
    [
        # Overlong command lines (max_line_length 512 here): complete, and not yet ended (the
        # rest is discarded up to the next LF without being buffered).
        (b"NOOP " + b"x" * 600 + b"\r\n", ["500 5.5.2 Line too long"]),
        (b"NOOP " + b"x" * 600, ["500 5.5.2 Line too long"]),
        (b"NOOP\0\r\n", ["500 5.5.2 Syntax error: control characters"]),
        (b"\0\0\0\r\n", ["500 5.5.2 Syntax error: control characters"]),
        (b"MAIL FROM:<\xff@example.org>\r\n", ["500 5.5.2 Syntax error: invalid UTF-8"]),
        (b"NOOP \xc3\x28\r\n", ["500 5.5.2 Syntax error: invalid UTF-8"]),
        (b"FOO bar\r\n", ["500 5.5.1 Command unrecognized"]),
        (b"AUTH PLAIN !!!!\r\n", ["500 5.5.1 Command unrecognized"]),
        (b"STARTTLS\r\n", ["500 5.5.1 Command unrecognized"]),
        (b"GET / HTTP/1.1\r\n", ["500 5.5.1 Command unrecognized"]),
        (b"\r\n", ["500 5.5.1 Command unrecognized"]),
        (b"HELO client.example\r\n", ["500 5.5.1 This is an LMTP server: use LHLO"]),
        (b"MAIL FROM:s@o.example\r\n", ["501 5.5.4 Syntax error: address must be enclosed in <>"]),
        (b"MAIL FROM:<s@o.example\r\n", ["501 5.5.4 Syntax error: unterminated <address>"]),
        (b"MAIL FROM:<s@o.example> SIZE=abc\r\n", ["501 5.5.4 Invalid SIZE parameter"]),
        (b"MAIL FROM:<s@o.example> FOO=1\r\n", ["555 5.5.4 Unsupported parameter FOO"]),
        (b"RCPT TO:<a@x>\r\n", ["503 5.5.1 Send MAIL first"]),
        (b"DATA\r\n", ["503 5.5.1 Send MAIL first"]),
        (b"DATA now\r\n", ["501 5.5.4 Syntax error: DATA takes no argument"]),
    ],
    ids=[
        "overlong-complete", "overlong-partial", "nul-in-command", "nul-only",
        "invalid-utf8-address", "invalid-utf8-argument", "unknown-command", "auth-bad-base64",
        "starttls", "http", "empty-line", "helo", "mail-without-brackets", "mail-unterminated",
        "bad-size", "unknown-parameter", "rcpt-before-mail", "data-before-mail", "data-argument",
    ],
)
def test_bad_commands_get_their_reply_and_the_session_goes_on(
    data: bytes, replies: list[str]
) -> None:
    protocol, transport, _service = session()
    protocol.dataReceived(data)
    if not data.endswith(b"\n"):
        protocol.dataReceived(b"yyyy\r\n")  # the end of the overlong line: discarded
    assert take(transport) == replies
    assert not transport.disconnecting
    protocol.dataReceived(b"NOOP\r\n")
    assert take(transport) == ["250 2.0.0 OK"]


def test_fifty_errors_close_the_session_with_421() -> None:
    protocol, transport, _service = session()
    protocol.dataReceived(b"FOO\r\n" * 60)
    lines = take(transport)
    assert lines == ["500 5.5.1 Command unrecognized"] * 50 + [
        "421 4.7.0 Too many errors, closing connection"
    ]
    assert transport.disconnecting


def test_bare_lf_commands_are_accepted() -> None:
    protocol, transport, _service = session()
    protocol.dataReceived(b"NOOP\nRSET\n")
    assert take(transport) == ["250 2.0.0 OK", "250 2.0.0 OK"]


def test_nul_and_invalid_utf8_in_data_are_stored_verbatim() -> None:
    protocol, transport, service = in_data()
    protocol.dataReceived(b"Subject: \xff\xfe\r\n\r\nbin\0ary \xc3\x28\r\n.\r\n")
    _envelope, body, done = service.deliveries[0]
    assert body.data == b"Subject: \xff\xfe\n\nbin\0ary \xc3\x28\n"
    done.callback([Reply(250, "2.0.0", "<a@x> Saved")])
    assert take(transport) == ["250 2.0.0 <a@x> Saved"]


def test_long_lines_in_data_are_not_limited() -> None:
    protocol, _transport, service = in_data()
    protocol.dataReceived(b"x" * 1500 + b"\r\n.\r\n")
    assert service.deliveries[0][1].data == b"x" * 1500 + b"\n"


def test_garbage_pipelined_after_the_end_of_data_is_answered_after_the_delivery() -> None:
    protocol, transport, service = in_data()
    protocol.dataReceived(b"hello\r\n.\r\nGARBAGE\r\n\0\r\nNOOP\r\n")
    assert take(transport) == []  # nothing before the delivery's replies
    service.deliveries[0][2].callback([Reply(250, "2.0.0", "<a@x> Saved")])
    assert take(transport) == [
        "250 2.0.0 <a@x> Saved",
        "500 5.5.1 Command unrecognized",
        "500 5.5.2 Syntax error: control characters",
        "250 2.0.0 OK",
    ]
    assert not transport.disconnecting


def test_garbage_pipelined_after_a_valid_command_in_one_read() -> None:
    protocol, transport, _service = session()
    protocol.dataReceived(b"NOOP\r\nGARBAGE\r\nRSET\r\n")
    assert take(transport) == [
        "250 2.0.0 OK", "500 5.5.1 Command unrecognized", "250 2.0.0 OK",
    ]


def test_connection_lost_mid_command_and_mid_data_leaves_nothing() -> None:
    protocol, transport, service, clock = make()
    take(transport)
    protocol.dataReceived(b"LHLO x\r\nNOO")
    protocol.connectionLost(None)
    assert take(transport) == ["250-mx.test", "250-ENHANCEDSTATUSCODES", "250-8BITMIME",
                               "250-SMTPUTF8", "250-SIZE 2048",
                               "250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE", "250 PIPELINING"]
    assert clock.getDelayedCalls() == []
    protocol, transport, service = in_data()
    protocol.dataReceived(b"Subject: cut\r\npart")
    protocol.connectionLost(None)
    assert service.deliveries == []
    assert transport.value() == b""
