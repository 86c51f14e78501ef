# -*- test-case-name: tests.unit.test_connections -*-
"""Counting connections per listener and capping them per daemon, the same way in every daemon.

``max_connections`` is one cap for the whole daemon, across all its listeners (an operator
sizes it against the process's descriptors and memory, which the listeners share): each
listener gets its own :class:`LimitedFactory` (its own metrics label) over one shared
:class:`ConnectionLimit`. Over the cap a new connection is closed at once (after an optional
protocol-specific refusal, e.g. LMTP's ``421``), so thousands of idle clients cannot exhaust
descriptors or memory.

With several worker processes (:mod:`mailplugins.workers`) the cap stays one cap for the daemon:
each worker publishes its open count in its own slot of a small file the supervisor made
(:func:`share_between_workers`) and a new connection is refused when the slots add up to the
cap. Workers accepting at the same instant may each see the other's count a moment late, so the
cap can be passed by at most one connection per worker.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from mailplugins.metrics import DaemonMetrics

log = Logger()


def peer_text(transport: Any) -> str:
    """The peer of a connection for a log line: ``host:port``, or ``local`` (a unix socket,
    or the transport already gone)."""
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", None)
    return f"{host}:{getattr(peer, 'port', '')}" if host else "local"


class CountedProtocol(ProtocolWrapper):
    """The wrapper LimitedFactory puts around each protocol: counts it open and closed."""

    factory: LimitedFactory

    def connectionMade(self) -> None:
        self.factory.opened(self)
        if IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            # Pass the peer's half-close (EOF) on, instead of Twisted closing at once: after
            # makeConnection, which replaces what this wrapper directly provides.
            alsoProvides(self, IHalfCloseableProtocol)
        super().connectionMade()

    def readConnectionLost(self) -> None:
        wrapped: Any = self.wrappedProtocol
        wrapped.readConnectionLost()

    def writeConnectionLost(self) -> None:
        wrapped: Any = self.wrappedProtocol
        wrapped.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.factory.closed(self)
        super().connectionLost(reason)


class _Refuse(Protocol):
    def __init__(self, message: bytes) -> None:
        self._message = message

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self._message:
            transport.write(self._message)
        transport.loseConnection()


class WorkerSlots:
    """Open-connection counts of a daemon's workers: one 8-byte slot each in a shared file."""

    def __init__(self, path: str, index: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self._count = len(self._map) // 8
        self._offset = index * 8
        self.set(0)  # a restarted worker's predecessor's connections died with it

    @staticmethod
    def create(path: str, workers: int) -> None:
        """The supervisor's side: a zeroed slot per worker."""
        with open(path, "wb") as f:
            f.write(bytes(8 * workers))

    @property
    def workers(self) -> int:
        return self._count

    def set(self, value: int) -> None:
        struct.pack_into("<q", self._map, self._offset, value)

    def own(self) -> int:
        """This worker's open count, as published."""
        value: int = struct.unpack_from("<q", self._map, self._offset)[0]
        return value

    def total(self) -> int:
        return sum(struct.unpack_from(f"<{self._count}q", self._map))


#: Set in a worker process: the daemon's limit counts across all its workers.
_slots: WorkerSlots | None = None


def share_between_workers(path: str, index: int) -> WorkerSlots:
    """Called once in a worker before its daemon is built (see :mod:`mailplugins.runner`); the
    slots also tell the worker's listening ports its share (:mod:`mailplugins.balance`)."""
    global _slots
    _slots = WorkerSlots(path, index)
    return _slots


class ConnectionLimit:
    """One daemon's ``max_connections``: open connections across all its listeners (and, in a
    worker, across all the daemon's workers)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._own = 0
        self._slots = _slots

    @property
    def open(self) -> int:
        """Open connections of the whole daemon."""
        return self._own if self._slots is None else self._slots.total()

    def add(self, delta: int) -> None:
        self._own += delta
        if self._slots is not None:
            self._slots.set(self._own)


class LimitedFactory(WrappingFactory):
    """One listener's factory: counts its connections, refuses when the daemon's limit is full."""

    protocol = CountedProtocol

    def __init__(
        self,
        wrapped: IProtocolFactory,
        *,
        listener: str,
        metrics: DaemonMetrics,
        limit: ConnectionLimit | None = None,
        maximum: int | None = None,
        refusal: bytes = b"",
    ) -> None:
        super().__init__(wrapped)
        if limit is None:
            if maximum is None:
                raise TypeError("LimitedFactory needs a limit or a maximum")
            limit = ConnectionLimit(maximum)
        self.limit = limit
        self.listener = listener
        self.refusal = refusal
        self._open = 0
        self._metrics = metrics
        self._gauge = metrics.open_connections.labels(listener)
        self._gauge.set(0)
        self.noisy = False

    @property
    def maximum(self) -> int:
        return self.limit.maximum

    @property
    def open_count(self) -> int:
        """Connections open on this listener (the daemon's total is ``limit.open``)."""
        return self._open

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.limit.open >= self.limit.maximum:
            self._metrics.refused_connections.labels(self.listener).inc()
            log.warn(
                "{listener}: refusing connection, {open} open in this daemon (max_connections)",
                listener=self.listener, open=self.limit.open,
            )
            refuse = _Refuse(self.refusal)
            return refuse
        return super().buildProtocol(addr)

    def opened(self, _protocol: ProtocolWrapper) -> None:
        self._open += 1
        self.limit.add(1)
        self._metrics.connections.labels(self.listener).inc()
        self._gauge.set(self._open)

    def closed(self, _protocol: ProtocolWrapper) -> None:
        self._open -= 1
        self.limit.add(-1)
        self._gauge.set(self._open)
