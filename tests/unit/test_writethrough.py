"""write_now: an answer sent at once on a plain socket, through Twisted's write otherwise."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from mailplugins.connections import LimitedFactory
from mailplugins.metrics import DaemonMetrics
from mailplugins.writethrough import write_now


class Recording(tcp.Connection):
    """A real ``tcp.Connection`` on a socketpair whose buffered writes are recorded, not sent."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, None)
        self.connected = True
        self.queued: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.queued.append(data)
        self._tempDataBuffer.append(data)


@pytest.fixture
def pair() -> Iterator[tuple[Recording, socket.socket]]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.settimeout(0.5)
    try:
        yield Recording(ours), peer
    finally:
        ours.close()
        peer.close()


def counted(transport: Recording) -> ProtocolWrapper:
    """The protocol's transport as LimitedFactory wraps it."""
    limited = LimitedFactory(Factory.forProtocol(Protocol), listener="test", maximum=10,
                             metrics=DaemonMetrics("test_writethrough"))
    wrapper = limited.buildProtocol(None)
    wrapper.makeConnection(transport)
    assert isinstance(wrapper, ProtocolWrapper)
    return wrapper


def test_sends_at_once_only_when_nothing_is_queued(pair: tuple[Recording, socket.socket]) -> None:
    transport, peer = pair
    wrapper = counted(transport)
    write_now(wrapper, b"action=DUNNO\n\n")
    assert peer.recv(100) == b"action=DUNNO\n\n" and transport.queued == []
    transport._tempDataBuffer.append(b"earlier")
    write_now(wrapper, b"later")  # must not overtake what is queued
    assert transport.queued == [b"later"]
    transport._tempDataBuffer.clear()
    transport.queued.clear()
    big = b"x" * 10_000_000  # more than the socket buffer takes: the rest is queued
    write_now(transport, big)
    sent = len(big) - sum(len(q) for q in transport.queued)
    assert 0 < sent < len(big) and transport.queued == [big[sent:]]


def test_any_other_wrapper_gets_the_bytes(pair: tuple[Recording, socket.socket]) -> None:
    """A wrapper that is not ours (TLS: it encrypts) must see every byte: nothing sent around it."""
    transport, peer = pair

    class Encrypting(ProtocolWrapper):
        written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

    tls = Encrypting(WrappingFactory(Factory()), Protocol())
    tls.makeConnection(transport)
    assert tls.socket is transport.socket  # ProtocolWrapper forwards attributes: not a test
    write_now(counted(tls), b"action=DUNNO\n\n")
    assert Encrypting.written == [b"action=DUNNO\n\n"]
    with pytest.raises(TimeoutError):
        peer.recv(100)


def test_relies_on_attributes_twisted_still_has() -> None:
    one, two = socket.socketpair()
    try:
        connection = tcp.Connection(one, None)
        assert connection.socket is one
        assert (connection.dataBuffer, connection.offset, connection._tempDataBuffer) == (b"", 0, [])
        assert hasattr(connection, "connected") and hasattr(connection, "disconnecting")
    finally:
        one.close()
        two.close()
