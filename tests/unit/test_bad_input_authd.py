"""Bad-input catalogue for authd: auth-client (Postfix SASL), dict (Dovecot 2.3) and HTTP verify.

Each case asserts the exact bytes written (or none) and whether the connection is closed. The
auth-client and dict protocols have no error reply for a broken line: like Dovecot, authd drops
the connection (counted in ``protocol_errors_total``). Timers run on a task.Clock.
"""

from __future__ import annotations

import base64
import re

import pytest
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from authd.http import REQUEST_TIMEOUT_RESPONSE, VerifySite
from authd.sasl import AuthClientProtocol
from tests.unit.test_authd_dict import HELLO as DICT_HELLO
from tests.unit.test_authd_dict import Rig as DictRig
from tests.unit.test_authd_http import post
from tests.unit.test_authd_sasl import HELLO, connect, plain
from tests.unit.test_authd_verify import Rig

GOOD = plain("alice@example.org", "s3cret")
AUTH_OK = b"OK\t1\tuser=alice@example.org\n"
BAD_INITIAL = b"FAIL\t1\tcode=invalid_base64\treason=Invalid base64 data in initial response\n"
BAD_CONTINUED = b"FAIL\t1\tcode=invalid_base64\treason=Invalid base64 data in continued response\n"


def sasl(rig: Rig | None = None) -> tuple[Rig, AuthClientProtocol, StringTransport]:
    rig = rig or Rig()
    protocol, transport = connect(rig)
    transport.clear()  # the handshake
    return rig, protocol, transport


def sasl_errors(rig: Rig) -> float:
    return rig.metric("protocol_errors_total", protocol="sasl")


def auth(request_id: int = 1, resp: str = GOOD, extra: str = "") -> bytes:
    return f"AUTH\t{request_id}\tPLAIN\tservice=smtp\t{extra}resp={resp}\n".encode()


# -- auth-client: broken lines drop the connection without a reply ------------------------


@pytest.mark.parametrize(
    "data",
    [
        HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + b"A" * 17000,  # overlong, unterminated
        HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + b"A" * 17000 + b"\n",
        HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\0\tresp=" + GOOD.encode() + b"\n",
        b"\0VERSION\t1\t0\n",
        HELLO + b"FOO\t1\n",  # unknown command
        HELLO + b"\n",  # empty line
        b"GET / HTTP/1.0\r\n\r\n",
        b"AUTH\t1\tPLAIN\tservice=smtp\n",  # before VERSION
        b"VERSION\t1\t0\nAUTH\t1\tPLAIN\tservice=smtp\n",  # before CPID
        b"VERSION\t2\t0\n",  # incompatible major version
        HELLO + b"AUTH\t1\tDIGEST-MD5\tservice=smtp\n",  # mechanism not offered
        HELLO + b"AUTH\tx\tPLAIN\tservice=smtp\n",  # malformed id
        HELLO + b"AUTH\t1\tPLAIN\tresp=AA==\n",  # no service
        HELLO + b"AUTH\t1\tLOGIN\tservice=smtp\nAUTH\t1\tLOGIN\tservice=smtp\n",  # duplicate id
    ],
    ids=[
        "overlong-partial", "overlong-complete", "nul-in-field", "nul-first", "unknown-command",
        "empty-line", "http", "auth-before-version",
        "auth-before-cpid", "bad-version", "unknown-mechanism", "malformed-id", "no-service",
        "duplicate-id",
    ],
)
def test_sasl_protocol_violations_drop_without_a_reply(data: bytes) -> None:
    rig, protocol, transport = sasl()
    protocol.dataReceived(data)
    expected = b"CONT\t1\tVXNlcm5hbWU6\n" if data.endswith(b"LOGIN\tservice=smtp\n") else b""
    assert transport.value() == expected
    assert transport.disconnecting
    assert sasl_errors(rig) == 1
    assert not protocol._deadline.running
    rig.clock.advance(60)
    assert transport.value() == expected  # nothing more, ever


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        # Bad base64 is a failed exchange, not a broken protocol: FAIL, the connection stays.
        (HELLO + auth(resp="!!!!"), BAD_INITIAL),
        (HELLO + auth(resp="QUJ"), BAD_INITIAL),
        (HELLO + auth(resp="QU JD"), BAD_INITIAL),
        (HELLO + b"AUTH\t1\tLOGIN\tservice=smtp\nCONT\t1\t%%%\n",
         b"CONT\t1\tVXNlcm5hbWU6\n" + BAD_CONTINUED),
        # Valid base64 of something that is not PLAIN, or not UTF-8.
        (HELLO + auth(resp=base64.b64encode(b"no nul at all").decode()),
         b"FAIL\t1\treason=Invalid input\n"),
        (HELLO + auth(resp=base64.b64encode(b"\0\xff\xfe\0pw").decode()),
         b"FAIL\t1\treason=Invalid input\n"),
        (HELLO + auth(resp=base64.b64encode(b"\0alice@example.org\0s3cret\0x").decode()),
         b"FAIL\t1\treason=Invalid input\n"),
        (HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\nCONT\t1\t\n",
         b"CONT\t1\t\nFAIL\t1\treason=Invalid input\n"),
        (HELLO + b"AUTH\t1\tLOGIN\tservice=smtp\nCONT\t1\t*\n",
         b"CONT\t1\tVXNlcm5hbWU6\n" + BAD_CONTINUED),
        # A CONT for a request that is gone (Postfix after our timeout).
        (HELLO + b"CONT\t7\tAAAA\n", b"FAIL\t7\treason=Authentication request timed out\n"),
        # Unknown AUTH parameters are ignored, as Dovecot does.
        (HELLO + auth(extra="x-future=1\t"), AUTH_OK),
        # A malformed request whose id is readable fails alone (issue #15 item 8).
        (HELLO + b"AUTH\t1\tPLAIN\tservice=\tresp=" + GOOD.encode() + b"\n",
         b"FAIL\t1\treason=Invalid service\n"),
        (HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\x011x\tresp=" + GOOD.encode() + b"\n",
         b"FAIL\t1\treason=Invalid service\n"),
        (HELLO + b"AUTH\t1\tPLAIN\tservice=smtp\trip=\xff\tresp=" + GOOD.encode() + b"\n", AUTH_OK),
        (HELLO + b"AUTH\t1\tPLAIN\tservice=sm\xfftp\tresp=" + GOOD.encode() + b"\n",
         b"FAIL\t1\treason=Invalid service\n"),
    ],
    ids=[
        "bad-base64", "bad-base64-padding", "bad-base64-space", "bad-base64-cont", "plain-without-nul",
        "plain-invalid-utf8", "plain-three-nuls", "plain-empty-cont", "login-abort",
        "cont-unknown-id", "unknown-parameter", "empty-service", "control-char-in-service",
        "invalid-utf8-rip", "invalid-utf8-service",
    ],
)
def test_sasl_failed_exchanges_are_answered_and_keep_the_connection(
    data: bytes, reply: bytes
) -> None:
    rig, protocol, transport = sasl()
    protocol.dataReceived(data)
    rig.clock.advance(0)
    assert transport.value() == reply
    assert not transport.disconnecting
    assert sasl_errors(rig) == 0
    # The connection still serves a good login.
    transport.clear()
    protocol.dataReceived(auth(request_id=9))
    rig.clock.advance(0)
    assert transport.value() == b"OK\t9\tuser=alice@example.org\n"


def test_sasl_garbage_in_the_same_read_as_a_valid_auth_drops_both() -> None:
    """Postfix never pipelines: a read holding an AUTH and garbage is not Postfix (Dovecot also
    aborts a connection's requests when it disconnects it)."""
    rig, protocol, transport = sasl()
    protocol.dataReceived(HELLO + auth() + b"GARBAGE\n")
    rig.clock.advance(10)
    assert transport.value() == b""
    assert transport.disconnecting


def test_sasl_garbage_in_a_later_read_drops_after_the_answer() -> None:
    rig, protocol, transport = sasl()
    protocol.dataReceived(HELLO + auth())
    rig.clock.advance(0)
    protocol.dataReceived(b"GARBAGE\n")
    assert transport.value() == AUTH_OK
    assert transport.disconnecting


def test_sasl_connection_lost_mid_line_and_mid_verification_leaves_nothing() -> None:
    rig, protocol, transport = sasl()
    protocol.dataReceived(HELLO + auth(resp=plain("alice@example.org", "wrong")) + b"AUTH\t2")
    protocol.connectionLost(Failure(ConnectionError("peer closed its side")))
    rig.clock.advance(30)
    assert transport.value() == b""
    assert rig.clock.getDelayedCalls() == []


def test_sasl_half_close_answers_the_logins_being_verified_then_closes() -> None:
    rig, protocol, transport = sasl()
    protocol.dataReceived(HELLO + auth(resp=plain("alice@example.org", "wrong")))
    protocol.readConnectionLost()
    assert transport.value() == b""  # the failure delay (2 s) runs first
    assert not transport.disconnecting
    rig.clock.advance(2.0)
    assert transport.value() == b"FAIL\t1\tuser=alice@example.org\n"
    assert transport.disconnecting


def test_sasl_half_close_drops_exchanges_waiting_for_a_cont() -> None:
    rig, protocol, transport = sasl()
    protocol.dataReceived(HELLO + b"AUTH\t1\tLOGIN\tservice=smtp\nAUTH\t2")
    protocol.readConnectionLost()
    assert transport.value() == b"CONT\t1\tVXNlcm5hbWU6\n"
    assert transport.disconnecting
    assert sasl_errors(rig) == 0


def test_sasl_one_byte_a_second_is_dropped_at_line_timeout() -> None:
    rig, protocol, transport = sasl(Rig(line_timeout="5s"))
    data = HELLO + auth()
    sent = 0
    while not transport.disconnecting:
        protocol.dataReceived(data[sent : sent + 1])
        sent += 1
        rig.clock.advance(1)
    assert sent == 5  # the first byte at t=0, dropped at t=5 in the middle of "VERSION"
    assert transport.value() == b""
    assert sasl_errors(rig) == 1
    protocol.connectionLost(Failure(ConnectionError("closed")))
    assert rig.clock.getDelayedCalls() == []


def test_sasl_line_timeout_counts_per_line_from_its_first_byte() -> None:
    rig, protocol, transport = sasl(Rig(line_timeout="5s"))
    protocol.dataReceived(b"VERSION\t1")
    rig.clock.advance(4.9)
    protocol.dataReceived(b"\t0\nCPID\t1")  # VERSION done at 4.9; CPID's line starts now
    rig.clock.advance(4.9)
    protocol.dataReceived(b"\n")
    rig.clock.advance(100)  # a complete line leaves no deadline, and there is no idle timeout
    assert not transport.disconnecting
    protocol.dataReceived(auth()[:10])
    rig.clock.advance(4.9)
    protocol.dataReceived(auth()[10:])
    rig.clock.advance(0)
    assert transport.value() == AUTH_OK
    protocol.dataReceived(b"AUTH")
    rig.clock.advance(5)
    assert transport.disconnecting
    assert transport.value() == AUTH_OK


def test_line_timeout_config() -> None:
    assert Rig().authd.line_timeout == 5.0
    from mailplugins.config.fields import ConfigError

    with pytest.raises(ConfigError, match="line_timeout"):
        Rig(line_timeout="2m")


# -- dict -------------------------------------------------------------------------------


def dict_errors(rig: DictRig) -> float:
    value = rig.factory.metrics.registry.registry.get_sample_value(
        "mailplugins_authd_protocol_errors_total", {"protocol": "dict"}
    )
    return value or 0.0


@pytest.mark.parametrize(
    "data",
    [
        DICT_HELLO + b"Lshared/passdb/" + b"a" * 17000,
        DICT_HELLO + b"Lshared/passdb/" + b"a" * 17000 + b"\n",
        DICT_HELLO + b"Lshared/passdb/\xffalice@example.org\n",
        DICT_HELLO + b"X\n",
        DICT_HELLO + b"\n",
        DICT_HELLO + b"I\n",
        DICT_HELLO + b"Ishared/userdb/\n",  # protocol 3 needs flags, max rows and path
        DICT_HELLO + b"Bx\n",
        DICT_HELLO + b"S5\tkey\tvalue\n",  # change in a transaction never begun
        b"Lshared/passdb/alice@example.org\n",  # before hello
        b"H9\t0\n",
        b"GET / HTTP/1.0\r\n\r\n",
        # A valid lookup in the same read as garbage is dropped with it (Dovecot never does this).
        DICT_HELLO + b"Lshared/passdb/alice@example.org\nGARBAGE\n",
    ],
    ids=[
        "overlong-partial", "overlong-complete", "invalid-utf8", "unknown-command", "empty-line",
        "malformed-iterate", "iterate-without-flags", "malformed-tid", "unknown-transaction", "before-hello",
        "bad-version", "http", "garbage-after-lookup",
    ],
)
def test_dict_protocol_violations_drop_without_a_reply(data: bytes) -> None:
    rig = DictRig()
    assert rig.send(data) == b""
    assert rig.transport.disconnecting
    assert dict_errors(rig) == 1
    assert rig.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        # A NUL or odd bytes inside a key name no mailbox: not found, the connection stays.
        (b"Lshared/passdb/al\0ice@example.org\n", b"N\n"),
        (b"Lshared/passdb/alice@example.org\0\n", b"N\n"),
        (b"L\n", b"N\n"),
        (b"Lshared/other/key\n", b"N\n"),
        (b"Lshared/passdb/a%b@example.org\n", b"N\n"),
        (b"I0\t0\tshared/quota/\n", b"\n"),
        (b"I0\t0\tshared/userdb/\n", b"Oshared/userdb/alice@example.org\t"),
    ],
    ids=["nul-in-key", "nul-after-key", "empty-key", "other-key", "routing-form",
         "iterate-elsewhere", "iterate-userdb"],
)
def test_dict_odd_lookups_are_answered(line: bytes, reply: bytes) -> None:
    rig = DictRig()
    answer = rig.send(DICT_HELLO + line)
    assert answer == reply if reply.endswith(b"\n") else answer.startswith(reply)
    assert not rig.transport.disconnecting


def test_dict_garbage_in_a_later_read_drops_after_the_answer() -> None:
    rig = DictRig()
    rig.send(DICT_HELLO)
    assert rig.send(b"Lshared/passdb/nobody@example.org\n") == b"N\n"
    assert rig.send(b"GARBAGE\n") == b""
    assert rig.transport.disconnecting


def test_dict_connection_lost_mid_line_and_mid_lookup_writes_nothing() -> None:
    rig = DictRig()
    rig.hold = True
    rig.send(DICT_HELLO + b"Lshared/passdb/alice@example.org\nLshared/pass")
    rig.protocol.connectionLost(Failure(ConnectionError("peer closed its side")))
    for d, fn, args in rig.pending:
        d.callback(fn(*args))
    assert rig.transport.value() == b""
    rig.clock.advance(10)
    assert rig.clock.getDelayedCalls() == []


def test_dict_half_close_replies_to_complete_commands_then_closes() -> None:
    rig = DictRig()
    rig.hold = True
    rig.send(DICT_HELLO + b"Lshared/passdb/nobody@example.org\nLshared/passdb/nob")
    rig.protocol.readConnectionLost()
    assert not rig.transport.disconnecting  # the lookup is still running
    for d, fn, args in rig.pending:
        d.callback(fn(*args))
    assert rig.transport.value() == b"N\n"
    assert rig.transport.disconnecting
    assert rig.clock.getDelayedCalls() == []


def test_dict_half_close_when_idle_closes_at_once() -> None:
    rig = DictRig()
    rig.send(DICT_HELLO)
    rig.protocol.readConnectionLost()
    assert rig.transport.disconnecting
    assert rig.transport.value() == b""


def test_dict_one_byte_a_second_is_dropped_at_line_timeout() -> None:
    rig = DictRig()
    assert rig.config.authd is not None and rig.config.authd.line_timeout == 5.0
    data = DICT_HELLO + b"Lshared/passdb/alice@example.org\n"
    sent = 0
    while not rig.transport.disconnecting:
        rig.protocol.dataReceived(data[sent : sent + 1])
        sent += 1
        rig.clock.advance(1)
    assert sent == 5
    assert rig.transport.value() == b""
    assert dict_errors(rig) == 1


def test_dict_line_timeout_restarts_for_each_line() -> None:
    rig = DictRig()
    rig.send(DICT_HELLO)
    lookup = b"Lshared/passdb/nobody@example.org\n"
    for _ in range(3):
        rig.protocol.dataReceived(lookup[:5])
        rig.clock.advance(4.9)
        rig.protocol.dataReceived(lookup[5:])
    assert rig.transport.value() == b"N\n" * 3
    rig.clock.advance(3600)  # no idle timeout on dict connections
    assert not rig.transport.disconnecting


# -- HTTP verify ------------------------------------------------------------------------


def http(rig: Rig, line_timeout: float = 5.0) -> tuple[object, StringTransport]:
    site = VerifySite(rig.verifier, 0.0, 16384, line_timeout=line_timeout, reactor=rig.clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def normalised(response: bytes) -> bytes:
    """The response with the Date and Server values (time, Twisted version) blanked."""
    return re.sub(rb"(?m)^(Date|Server): [^\r]*\r$", rb"\1: -\r", response)


def response(status: str, body: bytes, content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nServer: -\r\nDate: -\r\n".encode()
        + b"Content-Type: " + content_type + b"\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )


OK_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nok\n\r\n0\r\n\r\n"
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"
GOOD_FORM = {"user": "alice@example.org", "password": "s3cret", "service": "imap"}


def body_post(body: bytes) -> bytes:
    return (
        b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )


@pytest.mark.parametrize(
    ("data", "expected", "closed"),
    [
        (b"POST /verify HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 17000 + b"\r\n\r\n", b"", True),
        (b"POST /verify HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n", BAD_REQUEST, True),
        (b"GARBAGE\r\n\r\n", BAD_REQUEST, True),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", BAD_REQUEST, True),
        (b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", BAD_REQUEST, True),
        (body_post(b"user=%FF%FE&password=x"),
         response("400 Bad Request", b"user and password are required\n"), False),
        (body_post(b"user=alice%40example.org&password=s3cret&service=smtp%00"),
         response("400 Bad Request", b"invalid service\n"), False),
        (body_post(b"user=alice%40example.org&password=s3cret&service=%FF"),
         response("400 Bad Request", b"invalid service\n"), False),
        (body_post(b"user=alice%40example.org&password=s3cret&service=imap&x=%%%"),
         OK_CHUNKED, False),
        (b"GET /verify HTTP/1.1\r\nHost: x\r\n\r\n",
         b"HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nAllow: POST\r\n"
         b"Content-Length: 9\r\nContent-Type: text/html\r\n\r\nuse POST\n", False),
    ],
    ids=[
        "overlong-header", "nul-in-header", "garbage-request-line", "tls-hello",
        "bad-content-length", "invalid-utf8-user", "nul-in-service", "invalid-utf8-service",
        "bad-percent-escape", "get",
    ],
)
def test_http_bad_requests(data: bytes, expected: bytes, closed: bool) -> None:
    rig = Rig()
    channel, transport = http(rig)
    channel.dataReceived(data)  # type: ignore[attr-defined]
    rig.clock.advance(0.1)
    assert normalised(transport.value()) == expected
    assert bool(transport.disconnecting) == closed


def test_http_unknown_method_and_path_get_twisteds_answers() -> None:
    rig = Rig()
    channel, transport = http(rig)
    channel.dataReceived(b"FOO /verify HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 501 Not Implemented\r\n")
    channel, transport = http(rig)
    channel.dataReceived(b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert not transport.disconnecting


def test_http_garbage_after_a_valid_request_is_refused_after_its_answer() -> None:
    rig = Rig()
    channel, transport = http(rig)
    head, body = post(GOOD_FORM)
    channel.dataReceived(head + body + b"GARBAGE\r\n\r\n")  # type: ignore[attr-defined]
    rig.clock.advance(0.1)
    assert normalised(transport.value()) == OK_CHUNKED + BAD_REQUEST
    assert transport.disconnecting


def test_http_one_byte_a_second_gets_408_at_line_timeout() -> None:
    rig = Rig()
    channel, transport = http(rig, line_timeout=5.0)
    head, body = post(GOOD_FORM)
    data = head + body
    sent = 0
    while not transport.disconnecting:
        channel.dataReceived(data[sent : sent + 1])  # type: ignore[attr-defined]
        sent += 1
        rig.clock.advance(1)
    assert sent == 5
    assert transport.value() == REQUEST_TIMEOUT_RESPONSE
    assert transport.value() == (
        b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )


def test_http_slow_body_gets_408_and_time_answering_is_not_counted() -> None:
    rig = Rig()
    channel, transport = http(rig, line_timeout=5.0)
    head, body = post(GOOD_FORM)
    channel.dataReceived(head)  # type: ignore[attr-defined]
    rig.clock.advance(4.9)
    channel.dataReceived(body)  # type: ignore[attr-defined]  # complete at 4.9 s: answered
    rig.clock.advance(0.1)
    assert normalised(transport.value()) == OK_CHUNKED
    transport.clear()
    rig.clock.advance(60)  # between requests only Twisted's 120 s idle timeout applies
    assert not transport.disconnecting
    channel.dataReceived(head)  # type: ignore[attr-defined]
    rig.clock.advance(4.9)
    channel.dataReceived(body[:3])  # type: ignore[attr-defined]
    rig.clock.advance(0.1)
    assert transport.value() == REQUEST_TIMEOUT_RESPONSE
    assert transport.disconnecting


def test_http_connection_lost_mid_request_leaves_no_deadline() -> None:
    rig = Rig()
    channel, transport = http(rig)
    head, _ = post(GOOD_FORM)
    channel.dataReceived(head[:20])  # type: ignore[attr-defined]
    channel.connectionLost(Failure(ConnectionError("gone")))  # type: ignore[attr-defined]
    rig.clock.advance(10)
    assert transport.value() == b""
    assert rig.clock.getDelayedCalls() == []
