# -*- test-case-name: tests.unit.test_listening -*-
"""Listening sockets made once and shared by worker processes.

With ``workers: N`` the supervisor (:mod:`mailplugins.workers`) binds every listener itself
and passes the descriptors on; each worker adopts them (``reactor.adoptStreamPort``), so the
kernel hands each new connection to one of the workers (a burst split between them by
:mod:`mailplugins.balance`). Endpoint strings are read by Twisted's
own parsers, exactly as in a single process: a :class:`_Capture` stands in for the reactor and
records what ``listen()`` asked for (``listenTCP``/``listenSSL``/``listenUNIX``, or
``adoptStreamPort`` for ``systemd:`` descriptors), and we make the socket from that record.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import tcp, unix
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory

from mailplugins.balance import Balance

#: Environment of a worker: ``<listener key>=<fd>`` pairs, comma-separated.
FDS_ENV = "MAILPLUGINS_WORKER_FDS"


@dataclass
class ListenRequest:
    """What an endpoint's ``listen()`` asked the reactor for."""

    kind: str  # "tcp", "ssl", "unix" or "adopt"
    address: Any = None  # port number, or socket path
    interface: str = ""
    backlog: int = 50
    mode: int = 0o666
    #: ``adopt``: the descriptor systemd passed, and its address family.
    fd: int = -1
    family: int = socket.AF_INET
    #: ``ssl``: the TLS context factory, which workers wrap around the adopted port.
    context: Any = None


class _Capture:
    """Stands in for the reactor while an endpoint's ``listen()`` runs; listens nowhere."""

    def __init__(self) -> None:
        self.request: ListenRequest | None = None

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> None:
        self.request = ListenRequest("tcp", port, interface, backlog)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""  # noqa: N803
    ) -> None:
        self.request = ListenRequest("ssl", port, interface, backlog, context=contextFactory)

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0  # noqa: N803
    ) -> None:
        self.request = ListenRequest("unix", address, backlog=backlog, mode=mode)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> None:  # noqa: N803
        # The endpoint closes systemd's descriptor once the reactor has adopted it (which
        # takes a copy): keep a copy of our own.
        self.request = ListenRequest("adopt", fd=os.dup(fileDescriptor), family=addressFamily)


def listen_request(description: str) -> ListenRequest:
    """Parse an endpoint string as Twisted would listen on it.

    Raises KeyError/IndexError for a ``systemd:`` name or index that systemd did not pass, and
    ValueError for a malformed description, as :func:`serverFromString` does.
    """
    capture = _Capture()
    endpoint = serverFromString(capture, description)
    endpoint.listen(_NoFactory())
    if capture.request is None:
        raise ValueError(f"{description}: not a stream endpoint mailplugins can share")
    return capture.request


class _NoFactory:
    """The endpoint needs a factory argument; nothing ever connects to it."""


def bind(request: ListenRequest) -> socket.socket:
    """The listening socket for ``request``, inheritable by workers; OSError as ``bind`` gives it.

    ``adopt`` requests return a socket object on systemd's descriptor (not a copy), which
    therefore stays open as long as the supervisor runs.
    """
    if request.kind == "adopt":
        sock = socket.socket(request.family, socket.SOCK_STREAM, fileno=request.fd)
    elif request.kind == "unix":
        path = str(request.address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            if not path.startswith("\0"):
                os.chmod(path, request.mode)
            sock.listen(request.backlog)
        except OSError:
            sock.close()
            raise
    else:
        interface = request.interface
        family = socket.AF_INET6 if interface and isIPv6Address(interface) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # As Twisted does on POSIX: a restart must not wait for TIME_WAIT connections.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((interface, int(request.address)))
            sock.listen(request.backlog)
        except OSError:
            sock.close()
            raise
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def encode_fds(fds: dict[str, int]) -> str:
    return ",".join(f"{key}={fd}" for key, fd in fds.items())


def decode_fds(text: str) -> dict[str, int]:
    """The worker's side of :func:`encode_fds` (listener keys never contain ``,`` or ``=``)."""
    fds: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        key, _, fd = item.rpartition("=")
        fds[key] = int(fd)
    return fds


def adopt(
    reactor: Any, fd: int, description: str, factory: IProtocolFactory, balance: Balance | None = None
) -> IListeningPort:
    """Serve ``factory`` on the inherited listening socket ``fd`` (a worker's side).

    With ``balance`` (a worker of a daemon with several) the port accepts one connection at a
    time and leaves the socket to the other workers while this one holds more than its share
    (:mod:`mailplugins.balance`).

    TLS endpoints (``ssl:``) get the same TLS wrapper Twisted's ``listenSSL`` would put around
    the factory, built from the endpoint string's own certificate options. Twisted's port
    calls ``listen()`` and, for a unix socket, ``chmod()`` again when it starts: it is given the
    endpoint's backlog and the file's current mode, so neither changes under the supervisor.
    """
    probe = socket.socket(fileno=os.dup(fd))
    family, name = probe.family, probe.getsockname()
    probe.close()
    request = None
    if description.split(":", 1)[0].lower() != "systemd":
        request = listen_request(description)
        if request.kind == "ssl":
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = cast(IProtocolFactory, TLSMemoryBIOFactory(request.context, False, factory))
    port: Any
    if family == socket.AF_UNIX:
        port = _SharedUnixPort._fromListeningDescriptor(reactor, fd, factory)
        if isinstance(name, str) and name and not name.startswith("\0"):
            port.mode = stat.S_IMODE(os.stat(name).st_mode)
    else:
        port = _AdoptedPort._fromListeningDescriptor(reactor, fd, family, factory)
    port.balance = balance
    # Twisted's port calls listen() again: keep the endpoint's backlog, and for a socket
    # systemd made, systemd's default (SOMAXCONN) rather than Twisted's 50.
    port.backlog = request.backlog if request is not None else socket.SOMAXCONN
    port.startListening()
    return cast(IListeningPort, port)


class _AdoptedPort(tcp.Port):
    """An adopted socket, shared with the daemon's other workers when ``balance`` is set."""

    balance: Balance | None = None

    def doRead(self) -> Any:
        if self.balance is None:
            return super().doRead()
        # Twisted raises numberAccepts after each read that accepted as many as it allowed.
        self.numberAccepts = self.balance.accepts_per_read
        result = super().doRead()
        self.balance.after_read(self)
        return result


class _SharedUnixPort(unix.Port, _AdoptedPort):
    """An adopted unix socket whose path belongs to the supervisor.

    Twisted's unix port unlinks its path when it stops listening, adopted or not; a worker
    that exits (or is restarted) must leave the socket file to the workers still serving.
    """

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)
