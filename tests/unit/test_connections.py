"""Connections counted per listener and capped per daemon (max_connections)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailplugins.connections import ConnectionLimit, LimitedFactory, peer_text
from mailplugins.metrics import DaemonMetrics

ADDRESS = IPv4Address("TCP", "127.0.0.1", 1)


class Hold(Protocol):
    pass


def test_limited_factory_caps_and_counts() -> None:
    metrics = DaemonMetrics("testd")
    factory = LimitedFactory(Factory.forProtocol(Hold), listener="test", maximum=2, metrics=metrics,
                             refusal=b"421 busy\r\n")
    address = IPv4Address("TCP", "127.0.0.1", 1)
    transports = []
    for _ in range(2):
        protocol = factory.buildProtocol(address)
        transport = StringTransport()
        protocol.makeConnection(transport)
        transports.append((protocol, transport))
    assert factory.open_count == 2
    refused = factory.buildProtocol(address)
    refused_transport = StringTransport()
    refused.makeConnection(refused_transport)
    assert refused_transport.value() == b"421 busy\r\n"
    assert refused_transport.disconnecting
    body = metrics.render().decode()
    assert 'mailplugins_testd_open_connections{listener="test"} 2.0' in body
    assert 'mailplugins_testd_refused_connections_total{listener="test"} 1.0' in body
    assert 'mailplugins_testd_connections_total{listener="test"} 2.0' in body
    protocol, transport = transports[0]
    protocol.connectionLost(Failure(ConnectionError()))
    assert factory.open_count == 1
    again = factory.buildProtocol(address)
    again.makeConnection(StringTransport())
    assert factory.open_count == 2


def connect(factory: LimitedFactory) -> tuple[Protocol, StringTransport]:
    protocol = factory.buildProtocol(ADDRESS)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_one_limit_across_listeners() -> None:
    """max_connections is the daemon's: two listeners share it, each keeps its own counts."""
    metrics = DaemonMetrics("shared")
    limit = ConnectionLimit(3)
    one, two = (LimitedFactory(Factory.forProtocol(Hold), listener=name, limit=limit, metrics=metrics,
                               refusal=b"421 busy\r\n") for name in ("one", "two"))
    held = [connect(one), connect(one), connect(two)]
    assert (one.open_count, two.open_count, limit.open) == (2, 1, 3)
    assert connect(two)[1].value() == b"421 busy\r\n"
    assert connect(one)[1].value() == b"421 busy\r\n"
    body = metrics.render().decode()
    assert 'mailplugins_shared_refused_connections_total{listener="two"} 1.0' in body
    assert 'mailplugins_shared_open_connections{listener="one"} 2.0' in body
    held[0][0].connectionLost(Failure(ConnectionError()))
    assert limit.open == 2
    assert connect(two)[1].value() == b""  # served: a place freed on the other listener
    limit.maximum = 10  # a reload changes the one limit for every listener
    assert one.maximum == two.maximum == 10


def test_peer_text_names_the_client_or_says_local() -> None:
    from twisted.internet.address import UNIXAddress

    tcp = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40123))
    assert peer_text(tcp) == "192.0.2.7:40123"
    assert peer_text(StringTransport(peerAddress=UNIXAddress(None))) == "local"
    assert peer_text(None) == "local"


def test_one_cap_across_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker publishes its count in its slot of the supervisor's file; the cap is the sum."""
    from mailplugins import connections
    from mailplugins.connections import ConnectionLimit, WorkerSlots

    path = str(tmp_path / "slots")
    WorkerSlots.create(path, 2)
    monkeypatch.setattr(connections, "_slots", WorkerSlots(path, 0))
    first = ConnectionLimit(3)
    monkeypatch.setattr(connections, "_slots", WorkerSlots(path, 1))
    second = ConnectionLimit(3)
    first.add(1)
    second.add(1)
    second.add(1)
    assert first.open == second.open == 3
    second.add(-1)
    assert first.open == 2
    # A restarted second worker starts from nothing: its predecessor's connections died with it.
    WorkerSlots(path, 1)
    assert first.open == 1
