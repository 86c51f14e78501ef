"""authd.sasl: the Twisted protocol over a StringTransport, with a real verifier and a Clock."""

from __future__ import annotations

import base64

from twisted.internet.testing import StringTransport

from authd.sasl import AuthClientFactory, AuthClientProtocol
from tests.unit.test_authd_verify import Rig

HELLO = b"VERSION\t1\t0\nCPID\t4242\n"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def connect(rig: Rig) -> tuple[AuthClientProtocol, StringTransport]:
    factory = AuthClientFactory(
        verifier=rig.verifier, config=rig.authd, metrics=rig.authd_metrics, clock=rig.clock
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_handshake_sent_on_connect() -> None:
    _, transport = connect(Rig())
    lines = transport.value().decode().split("\n")
    assert [line.split("\t")[0] for line in lines[:-1]] == [
        "VERSION", "MECH", "MECH", "SPID", "CUID", "COOKIE", "DONE",
    ]
    assert lines[1] == "MECH\tPLAIN\tplaintext"
    assert len(lines[5].split("\t")[1]) == 32


def test_ok_and_delayed_fail_on_one_connection() -> None:
    rig = Rig()
    protocol, transport = connect(rig)
    transport.clear()
    protocol.dataReceived(
        HELLO + f"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip=127.0.0.1\t"
        f"resp={plain('alice@example.org', 's3cret')}\n".encode()
    )
    assert transport.value() == b"OK\t1\tuser=alice@example.org\n"
    transport.clear()
    protocol.dataReceived(
        f"AUTH\t2\tPLAIN\tservice=smtp\trip=127.0.0.1\tresp={plain('alice@example.org', 'x')}\n".encode()
    )
    assert transport.value() == b""
    rig.clock.advance(2.0)
    assert transport.value() == b"FAIL\t2\tuser=alice@example.org\n"
    assert not transport.disconnecting


def test_tempfail_closes_the_connection() -> None:
    rig = Rig()
    rig.db_down = True
    protocol, transport = connect(rig)
    transport.clear()
    protocol.dataReceived(
        HELLO + f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('alice@example.org', 's3cret')}\n".encode()
    )
    assert transport.disconnecting
    assert transport.value() == b""


def test_protocol_error_drops_and_counts() -> None:
    rig = Rig()
    protocol, transport = connect(rig)
    protocol.dataReceived(HELLO + b"AUTH\t1\tDIGEST-MD5\tservice=smtp\n")
    assert transport.disconnecting
    assert rig.metric("protocol_errors_total", protocol="sasl") == 1


def test_answer_after_disconnect_is_not_written() -> None:
    rig = Rig()
    protocol, transport = connect(rig)
    protocol.dataReceived(
        HELLO
        + f"AUTH\t1\tPLAIN\tservice=smtp\trip=1.2.3.4\tresp={plain('alice@example.org', 'x')}\n".encode()
    )
    transport.clear()
    protocol.connectionLost()
    rig.clock.advance(5)
    assert transport.value() == b""


def test_abandoned_login_is_swept() -> None:
    rig = Rig(continue_timeout="10s")
    protocol, _ = connect(rig)
    protocol.dataReceived(HELLO + b"AUTH\t1\tLOGIN\tservice=smtp\n")
    assert list(protocol.session.requests) == [1]
    rig.clock.advance(30)
    assert protocol.session.requests == {}
    protocol.connectionLost()
    assert not rig.clock.getDelayedCalls()
